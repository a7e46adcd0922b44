"""k-NN sweep: every cell equals the single-setting k-NN; the CLI on a run folder, its sources agree."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from eval_data import REPO, knn_oracle, make_eval_data, make_run, tiny_cfg, tiny_model
from moca_fast.cpu_threads import choose_threads
from moca_fast.io.teacher import load_teacher
from moca_fast.probes.knn import SWEEP_K, SWEEP_TEMPERATURES, knn_sweep_correct


def test_every_sweep_cell_matches_the_brute_force_oracle():
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(200, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 7, (200,), generator=g)
    queries = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    query_labels = torch.randint(0, 7, (60,), generator=g)
    ks, temps = (10, 20), (0.03, 0.07, 0.5)
    counts = knn_sweep_correct(bank, labels, queries, query_labels, ks, temps, 7, chunk=16)
    for i, k in enumerate(ks):
        for j, t in enumerate(temps):
            assert tuple(counts[i, j].tolist()) == knn_oracle(bank, labels, queries, query_labels, k, t, 7), (k, t)
    assert SWEEP_K == (10, 20) and len(SWEEP_TEMPERATURES) == 10 and SWEEP_TEMPERATURES[1] == 0.04


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn_eval")
    return make_run(root / "run"), make_eval_data(root / "data")


def _cli(run, data, out, launcher=()):
    proc = subprocess.run([sys.executable, *launcher, "-m", "moca_fast.eval", "knn", "--checkpoint", str(run),
                           "--data", str(data), "--output", str(out), "--num-workers", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_rank(run_and_data, tmp_path_factory):
    return _cli(*run_and_data, tmp_path_factory.mktemp("knn_one") / "knn.json")


def test_cli_sweep_on_a_run_folder(one_rank):
    proc, result = one_rank
    assert result["protocol"] == "knn" and len(result["cells"]) == 20
    best = max(result["cells"], key=lambda c: c["top1"])
    assert (result["top1"], result["k"], result["temperature"]) == (best["top1"], best["k"], best["temperature"])
    assert proc.stdout.strip().splitlines()[-1].startswith(f"k-NN: top-1 {best['top1']:.2f} %")
    assert result["val_images"] == 9 and result["train_images"] == 18


def test_torch_gets_the_cores_the_loader_leaves_as_in_training(one_rank):
    choice = choose_threads(0, 0)  # the command's environment and cores; --num-workers 0
    assert f"torch intra-op threads per rank: {choice.threads} ({choice.reason}; cpu_threads=N overrides)" in \
        one_rank[0].stderr


def test_two_gloo_ranks_give_the_one_rank_sweep(run_and_data, one_rank, tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    _, two = _cli(*run_and_data, tmp_path / "two.json", launcher)
    assert two["cells"] == one_rank[1]["cells"] and two["val_images"] == 9


def test_every_source_gives_the_same_teacher(run_and_data, tmp_path):
    from moca_fast.io import export_teacher_timm, save_model

    model = tiny_model()
    save_model(model, tmp_path / "model.pt")
    export_teacher_timm(model, tmp_path / "teacher.safetensors")
    export_teacher_timm(model, tmp_path / "teacher.pth")
    expected = model.teacher.state_dict()
    for source in (run_and_data[0], tmp_path / "model.pt", tmp_path / "teacher.safetensors", tmp_path / "teacher.pth"):
        got = load_teacher(str(source), None, "cpu").encoder.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), source
    torch.manual_seed(tiny_cfg().seed)
    from moca_fast.model.moca import MOCA

    fresh = MOCA(tiny_cfg().replace(batch_size=4), 1).teacher.state_dict()
    random_init = load_teacher(None, "tiny", "cpu").encoder.state_dict()
    assert all(torch.equal(random_init[k], fresh[k]) for k in fresh)

