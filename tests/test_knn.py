"""k-NN evaluation (DINO protocol): hand-derived votes, a brute-force oracle, 2 ranks == 1 rank, the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from eval_data import knn_oracle
from jpeg_folder import write_class_folders, write_run_folder
from moca_fast import build_model
from moca_fast.config import load_config
from moca_fast.probes.knn import build_knn_loaders, gather_bank, knn_accuracy, knn_correct

FEATURE_TOL = 1e-5  # fp32 features of the same image computed in different batch compositions
REPO = Path(__file__).resolve().parents[1]


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # one class-1 neighbour at similarity 1 against two class-0 neighbours at 0.6
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    query, query_label = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # T = 0.07: e^(1/0.07) > 2 e^(0.6/0.07); T = 10: e^0.1 = 1.105 < 2 e^0.06 = 2.124
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07) and math.exp(0.1) < 2 * math.exp(0.06)
    assert knn_correct(bank, labels, query, query_label, k=3, temperature=0.07, num_classes=2) == (1, 1)
    assert knn_correct(bank, labels, query, query_label, k=3, temperature=10.0, num_classes=2) == (0, 1)
    assert knn_correct(bank, labels, query, query_label, k=1, temperature=10.0, num_classes=2) == (1, 1)


def test_top5_counts_a_hit_among_the_five_best_classes():
    # query nearest to classes 0..5 in that order; its label 4 is 5th best, label 5 is 6th
    bank = F.normalize(torch.stack([torch.tensor([1.0, 0.1 * i]) for i in range(6)]), dim=1)
    labels = torch.arange(6)
    query = torch.tensor([[1.0, 0.0]])
    assert knn_correct(bank, labels, query, torch.tensor([4]), 6, 0.07, 6) == (0, 1)
    assert knn_correct(bank, labels, query, torch.tensor([5]), 6, 0.07, 6) == (0, 0)
    assert knn_correct(bank, labels, query, torch.tensor([0]), 6, 0.07, 6) == (1, 1)


def test_votes_stay_finite_and_exact_at_a_tiny_temperature():
    """At T = 0.001, exp(sim / T) overflows fp32 for any sim > 0.09 (every vote inf: chance accuracy). Each query
    here has one neighbour of its class at similarity 0.95 and three of another class at 0.94: its own class
    wins for T < 0.01 / ln 3 = 0.0091, the other for larger T."""
    queries, bank, labels, query_labels = [], [], [], []
    for i in range(12):
        axis = F.one_hot(torch.tensor(2 * i), 24).float()
        side = F.one_hot(torch.tensor(2 * i + 1), 24).float()
        queries.append(axis)
        query_labels.append(i % 4 + 1)
        for sim, label in ((0.95, i % 4 + 1), (0.94, 0), (0.94, 0), (0.94, 0)):
            bank.append(sim * axis + math.sqrt(1 - sim**2) * side)
            labels.append(label)
    bank, queries = torch.stack(bank), torch.stack(queries)
    labels, query_labels = torch.tensor(labels), torch.tensor(query_labels)
    assert knn_correct(bank, labels, queries, query_labels, k=4, temperature=0.001, num_classes=5) == (12, 12)
    assert knn_correct(bank, labels, queries, query_labels, k=4, temperature=0.02, num_classes=5) == (0, 12)
    assert knn_correct(bank, labels, queries, query_labels, k=4, temperature=1e-30, num_classes=5) == (12, 12)


def test_matches_a_brute_force_oracle_on_random_features():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 10, (300,), generator=g)
    queries = F.normalize(torch.randn(50, 16, generator=g, dtype=torch.float64), dim=1)
    query_labels = torch.randint(0, 10, (50,), generator=g)
    got = knn_correct(bank, labels, queries, query_labels, k=20, temperature=0.07, num_classes=10, chunk=7)
    assert got == knn_oracle(bank, labels, queries, query_labels, 20, 0.07, 10)


@pytest.fixture(scope="module")
def knn_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    write_class_folders(root / "train", per_class=5, classes=2, seed=1)  # 10 images: ranks get 5 + 5
    write_class_folders(root / "val", per_class=3, classes=2, seed=2)  # 6 images
    (root / "val" / "c1" / "2.jpg").unlink()  # 5 images: ranks get 3 + 2
    return root


def _tiny_model():
    torch.manual_seed(0)
    return build_model("tiny")


def _cfg():
    return load_config("tiny", overrides=dict(batch_size=4, num_workers=0))


def _two_rank_main(rank, root, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank, world_size=2)
    model = _tiny_model()
    loaders = build_knn_loaders(_cfg(), f"{root}/train", f"{root}/val", rank, 2, "cpu")
    from moca_fast.probes.knn import extract_features

    bank, _ = gather_bank(*extract_features(model, loaders[0]), loaders[0].num_images)
    result = knn_accuracy(model, *loaders, k=3, temperature=0.07)
    torch.save({"bank": bank, "result": result}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_gather_the_bank_and_match_one_rank(knn_folders, tmp_path):
    mp.spawn(_two_rank_main, args=(str(knn_folders), str(tmp_path)), nprocs=2, join=True)
    model = _tiny_model()
    loaders = build_knn_loaders(_cfg(), knn_folders / "train", knn_folders / "val", 0, 1, "cpu")
    single = knn_accuracy(model, *loaders, k=3, temperature=0.07)
    from moca_fast.probes.knn import extract_features

    feats, labels, indices = extract_features(model, loaders[0])
    assert torch.equal(indices, torch.arange(10)), "one rank sees every image in order"
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["bank"], feats, atol=FEATURE_TOL, rtol=0), f"rank {rank} bank != 1-rank features"
        assert got["result"] == single, f"rank {rank}"
    assert single["val_images"] == 5 and single["train_images"] == 10


def test_compiled_teacher_compiles_one_shape_whatever_the_ragged_batches(knn_folders):
    """The in-training k-NN on compiled blocks (the trainer's fast path): the ragged last batches (10 train and
    5 val images at batch 4: 4, 4, 2 and 4, 1) are padded to the batch size, so the teacher's blocks compile for
    one input shape only, over two evaluations (dynamo's graph counter; without the padding: 3 shapes), and the
    features and accuracy are the eager model's."""
    from torch._dynamo.utils import counters

    from moca_fast.probes.knn import extract_features
    from moca_fast.model.fastpath import FastOptions, prepare_fast

    torch._dynamo.reset()
    eager = _tiny_model()
    compiled = prepare_fast(_tiny_model(), FastOptions(bf16_weights=False, matmul_patch_embed=False,
                                                       compile_blocks=True, compile_backend="aot_eager"))
    loaders = build_knn_loaders(_cfg(), knn_folders / "train", knn_folders / "val", 0, 1, "cpu")
    graphs = counters["stats"]["unique_graphs"]
    results = [knn_accuracy(compiled, *loaders, k=3, temperature=0.07) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] - graphs == 1, "one compiled shape for every batch size"
    assert results[0] == results[1] == knn_accuracy(eager, *loaders, k=3, temperature=0.07)
    for loader in loaders:
        got, got_labels, _ = extract_features(compiled, loader)
        want, want_labels, _ = extract_features(eager, loader)
        assert got.shape == want.shape and torch.equal(got_labels, want_labels)
        assert torch.allclose(got, want, atol=FEATURE_TOL, rtol=0)


def test_cli_on_a_checkpoint_folder_matches_the_in_process_result(knn_folders, tmp_path):
    model = _tiny_model()
    with torch.no_grad():  # a teacher unlike the student, to check the teacher is what is evaluated
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_run_folder(tmp_path, model, _cfg())

    run = subprocess.run([sys.executable, "-m", "moca_fast.eval.knn", "--checkpoint", str(tmp_path),
                          "--data", str(knn_folders), "--k", "3", "--temperature", "0.07",
                          "--output", str(tmp_path / "knn.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cli = json.loads((tmp_path / "knn.json").read_text())
    assert run.stdout.strip().splitlines()[-1].startswith(f"k-NN: top-1 {cli['top1']:.2f} %")

    loaders = build_knn_loaders(_cfg(), knn_folders / "train", knn_folders / "val", 0, 1, "cpu")
    expected = knn_accuracy(model, *loaders, k=3, temperature=0.07)
    assert (cli["top1"], cli["top5"], cli["val_images"]) == (expected["top1"], expected["top5"], 5)


def test_cli_names_a_missing_checkpoint_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "moca_fast.eval.knn", "--checkpoint", str(tmp_path / "none"),
                          "--data", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --checkpoint") and "not a checkpoint folder" in last, last
