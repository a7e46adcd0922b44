"""The online codebook: FIFO queue, interior tokens, unit norm, dist_norm EMA, identity across ranks."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moca_fast.model.codebook import OnlineCodebook, interior_token_ids


def _codebook(K=12, C=5, grid=6, n=4, offset=2, sync="rank0"):
    return OnlineCodebook(K, C, grid, num_new_words=n, skip_offset=offset, sync=sync)


def test_init_unit_norm_and_nonnegative():
    cb = _codebook(K=64, C=16)
    assert torch.allclose(cb.words.norm(dim=1), torch.ones(64), atol=1e-6)
    assert (cb.words >= 0).all()
    assert cb.dist_norm.item() == 0.5 and cb.dist_norm_prev.item() == 0.5


def test_interior_ids():
    assert interior_token_ids(6, 2).tolist() == [14, 15, 20, 21]
    assert interior_token_ids(3, 0).tolist() == list(range(9))


def test_fifo_order_and_pointer_wrap():
    cb = _codebook(K=12, C=3)
    batches = [torch.randn(4, 3) for _ in range(4)]
    original = cb.words.clone()
    cb.enqueue(batches[0])
    assert torch.equal(cb.words[:4], batches[0]) and torch.equal(cb.words[4:], original[4:])
    assert cb.ptr.item() == 4
    cb.enqueue(batches[1])
    cb.enqueue(batches[2])
    assert cb.ptr.item() == 0, "pointer wraps at K"
    cb.enqueue(batches[3])
    assert torch.equal(cb.words[:4], batches[3]), "the oldest words are overwritten first"
    assert torch.equal(cb.words[4:8], batches[1]) and torch.equal(cb.words[8:], batches[2])


def test_new_words_are_normalised_interior_teacher_tokens():
    grid, C = 6, 8
    cb = _codebook(K=16, C=C, grid=grid, n=4)
    tokens = torch.randn(5, grid * grid, C) * 3
    interior = set(interior_token_ids(grid, 2).tolist())
    for _ in range(20):
        words = cb.draw_words(tokens, 4)
        assert torch.allclose(words.norm(dim=1), torch.ones(4), atol=1e-6)
        flat = F.normalize(tokens, dim=2).reshape(-1, C)
        images_seen = []
        for w in words:
            idx = (flat - w).abs().sum(1).argmin().item()
            assert torch.allclose(flat[idx], w, atol=1e-6)
            image, pos = divmod(idx, grid * grid)
            assert pos in interior
            images_seen.append(image)
        assert len(set(images_seen)) == 4, "one token from each of n distinct images"


def test_dist_norm_ema_and_lag():
    cb = _codebook()
    cb.update_dist_norm(torch.tensor(0.3))
    cb.update_dist_norm(torch.tensor(-0.7))  # |stat| is used
    expected = (0.5 * 0.99 + 0.01 * 0.3) * 0.99 + 0.01 * 0.7
    assert cb.dist_norm.item() == pytest.approx(expected, rel=1e-6)
    assert cb.dist_norm_prev.item() == 0.5, "the step's temperature uses the previous step's value"
    assert cb.inv_temperature().item() == pytest.approx(10 / 0.5)
    cb.step(torch.randn(4, 36, 5))
    assert cb.dist_norm_prev.item() == pytest.approx(expected, rel=1e-6)
    assert cb.inv_temperature().item() == pytest.approx(10 / expected, rel=1e-6)


def _rank_main(rank, world, init_file, out_dir, sync):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cb = _codebook(K=16, C=6, grid=6, n=4, sync=sync)  # same initial words on both ranks
    torch.manual_seed(100 + rank)  # but each rank sees different tokens and draws differently
    drawn = []
    for step in range(3):
        tokens = torch.randn(4, 36, 6)
        cb.update_dist_norm(torch.rand(()))
        state = torch.get_rng_state()
        drawn.append(cb.draw_words(tokens, cb.num_new_words // world))
        torch.set_rng_state(state)
        cb.step(tokens)
    torch.save({"state": cb.state_dict(), "drawn": drawn}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("sync", ["rank0", "gather"])
def test_codebook_identical_across_two_gloo_ranks(tmp_path, sync):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), sync), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("words", "ptr", "dist_norm", "dist_norm_prev"):
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    words = r0["state"]["words"]
    if sync == "rank0":  # 2 words per step, rank 0's only
        assert r0["state"]["ptr"].item() == 6
        for step in range(3):
            assert torch.equal(words[2 * step:2 * step + 2], r0["drawn"][step])
    else:  # every rank contributes its 2 words per step, in rank order
        assert r0["state"]["ptr"].item() == 12
        for step in range(3):
            assert torch.equal(words[4 * step:4 * step + 2], r0["drawn"][step])
            assert torch.equal(words[4 * step + 2:4 * step + 4], r1["drawn"][step])
    assert not math.isclose(r0["state"]["dist_norm"].item(), 0.5)
