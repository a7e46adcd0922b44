"""Invariants of the two complementary masking rounds (DESIGN §1)."""
import torch

from moca_fast.config import load_config
from moca_fast.model.masks import make_two_complementary_masks


def _rounds(cfg, n=8):
    return make_two_complementary_masks(n, cfg.num_patches, cfg.len_keep(), cfg.len_dec())


def test_paper_counts():
    cfg = load_config("vit_base_dec2")
    assert cfg.num_patches == 196
    assert cfg.len_keep() == (88, 49)
    assert cfg.len_dec() == (127, 88)


def test_rounds_are_permutations_with_complementary_encoders_and_shared_decoder_positions():
    cfg = load_config("vit_base_dec2")
    (k1, k2), (d1, d2) = cfg.len_keep(), cfg.len_dec()
    ids1, ids2 = _rounds(cfg)
    L = cfg.num_patches
    for b in range(ids1.shape[0]):
        for ids in (ids1[b], ids2[b]):
            assert torch.equal(ids.sort().values, torch.arange(L))
        enc1, dec1 = set(ids1[b, :k1].tolist()), set(ids1[b, :d1].tolist())
        enc2, dec2 = set(ids2[b, :k2].tolist()), set(ids2[b, :d2].tolist())
        assert len(enc1) == 88 and len(enc2) == 49 and len(dec1) == 127 and len(dec2) == 88
        assert enc1 <= dec1 and enc2 <= dec2
        assert not enc2 & dec1, "round 2's encoder tokens lie outside round 1's decoder positions"
        shared = dec1 - enc1
        assert len(shared) == 39 and dec2 - enc2 == shared, "both rounds share the 39 extra decoder positions"


def test_masks_differ_per_image_and_follow_global_generator():
    cfg = load_config("tiny")
    torch.manual_seed(3)
    a = _rounds(cfg)
    torch.manual_seed(3)
    b = _rounds(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], a[0][1])
