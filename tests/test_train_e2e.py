"""The real entry point end to end: `deepspeed --num_gpus 2 launch/train.py` on CPU (gloo, fp32, ZeRO-2)
stopped and resumed is bit-identical to an uninterrupted run; SIGTERM saves and exits 0; a non-finite
loss exits non-zero with the last good checkpoint intact; the output folder's contents."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moca_fast.distributed import free_port
from jpeg_folder import write_class_folders

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "train.py")
# 24 images, 2 ranks, batch 2, grad_accum 2: 3 optimiser steps per epoch, 6 in the 2 epochs
TINY_RUN = ["--preset", "tiny", "batch_size=2", "grad_accum=2", "epochs=2", "log_every=1", "num_workers=0"]
STOP_AT, END_AT = 2, 5
WORDS_PER_STEP = 4 // 2  # tiny: num_new_words=4 over 2 ranks, rank 0's words kept
METRIC_KEYS = {"step", "epoch", "loss", "loss_img", "loss_loc", "lr", "wd", "momentum", "img_per_s", "input_wait"}


def _env():
    # one thread per rank: identical (deterministic) CPU kernels in every run, no oversubscription
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}



def _deepspeed_cli() -> list[str]:
    beside_python = Path(sys.executable).with_name("deepspeed")
    found = str(beside_python) if beside_python.exists() else shutil.which("deepspeed")
    assert found, "the deepspeed launcher is not installed"
    return [found]


def _launch_two_ranks(args: list[str], log: Path) -> subprocess.Popen:
    cmd = _deepspeed_cli() + ["--num_gpus", "2", "--master_port", str(free_port()), LAUNCH] + TINY_RUN + args
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path, timeout: int = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_identical(a, b, where: str) -> int:
    """Recursively: tensors bit-identical, other leaves equal; returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(_assert_identical(a[k], b[k], f"{where}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(_assert_identical(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    return 0


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("train_jpegs"), per_class=12, classes=2)


def test_two_rank_run_stopped_and_resumed_is_identical_to_an_uninterrupted_one(jpegs, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--data", str(jpegs)]
    # the uninterrupted run also evaluates k-NN (at start, after epoch 1, at the end): it must not perturb training
    knn = [f"knn_train={jpegs}", f"knn_val={jpegs}", "eval_every=1"]
    uninterrupted = _launch_two_ranks(common + knn + ["--output", str(full), "--max-steps", str(END_AT)],
                                      tmp_path / "a.log")
    first_part = _launch_two_ranks(common + ["--output", str(split), "--max-steps", str(STOP_AT)], tmp_path / "b1.log")
    _finish(uninterrupted, tmp_path / "a.log")
    _finish(first_part, tmp_path / "b1.log")
    assert (split / "checkpoints" / "latest").read_text().strip() == f"step_{STOP_AT:08d}"
    second_part = _launch_two_ranks(common + ["--output", str(split), "--max-steps", str(END_AT), "--resume", "auto"],
                                    tmp_path / "b2.log")
    _finish(second_part, tmp_path / "b2.log")

    # the same losses and schedules at every step, before and after the resume
    a = [r for r in _metrics(full) if "loss" in r]
    b = _metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, END_AT + 1))
    for ra, rb in zip(a, b):
        assert METRIC_KEYS <= ra.keys()
        for key in ("loss", "loss_img", "loss_loc", "lr", "wd", "momentum", "epoch"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in a)

    # the same weights (student, teacher, codebook), optimiser partitions, data position and RNG
    final = f"step_{END_AT:08d}"
    ca, cb = full / "checkpoints" / final, split / "checkpoints" / final
    files = sorted(p.name for p in (ca / "deepspeed").glob("*.pt"))
    assert "mp_rank_00_model_states.pt" in files and len([f for f in files if "optim_states" in f]) == 2
    compared = 0
    for name in files:
        sa, sb = _load(ca / "deepspeed" / name), _load(cb / "deepspeed" / name)
        key = "module" if "module" in sa else "optimizer_state_dict"
        compared += _assert_identical(sa[key], sb[key], name)
    for rank in range(2):
        ta, tb = _load(ca / f"trainer_rank{rank:05d}.pt"), _load(cb / f"trainer_rank{rank:05d}.pt")
        assert ta["step"] == tb["step"] == END_AT and ta["loader"] == tb["loader"]
        compared += _assert_identical(ta["rng"]["torch"], tb["rng"]["torch"], f"rank {rank} rng")
    assert compared > 50

    module = _load(ca / "deepspeed" / "mp_rank_00_model_states.pt")["module"]
    assert int(module["codebook.ptr"]) == END_AT * WORDS_PER_STEP, "one codebook update per optimiser step"
    assert all(module[k].dtype == torch.float32 for k in module if k.startswith(("teacher.", "codebook.words")))
    student, teacher = module["encoder.blocks.0.attn.qkv.weight"], module["teacher.blocks.0.attn.qkv.weight"]
    assert not torch.equal(student, teacher), "the teacher is an EMA, not a copy"

    # k-NN records: after epoch 1 (step 3) in metrics.jsonl, the final and random-init ones in eval.json
    knn_records = [r for r in _metrics(full) if "knn_top1" in r]
    assert [r["step"] for r in knn_records] == [3]
    result = json.loads((full / "eval.json").read_text())
    assert result["step"] == END_AT and result["train_images"] == result["val_images"] == 24
    assert 0 <= result["knn_top1"] <= result["knn_top5"] == 100.0, "2 classes: top-5 always hits"
    assert result["knn_top1_random_init"] is not None

    # the run folder
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    assert cfg["batch_size"] == 2 and cfg["grad_accum"] == 2 and cfg["data"] == str(jpegs)
    env = json.loads((full / "env.json").read_text())
    assert env["world_size"] == 2 and env["precision"] == "fp32" and env["data_backend"] == "torch"
    assert env["attention_backend"] == "sdpa" and env["kernel_impl"] == "reference" and env["fast_path"] is None
    assert env["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert env["versions"]["deepspeed"] and env["versions"]["torch"]
    meta = json.loads((ca / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == END_AT and meta["config"]["grad_accum"] == 2
    assert list((full / "tensorboard").glob("events.*")), "TensorBoard scalars (tensorboard is a dev dependency)"


def _single_process(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, LAUNCH, "--preset", "tiny", "--data-backend", "synthetic", "log_every=1"] + args
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = _single_process(["--output", str(out), "--max-steps", "100000"], tmp_path / "log")
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 2):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
    last_logged = _metrics(out)[-1]["step"]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    saved_step = json.loads((latest / "meta.json").read_text())["step"]
    assert 2 <= saved_step == last_logged < 100000
    assert _load(latest / "trainer_rank00000.pt")["step"] == saved_step
    assert not list((out / "checkpoints").glob(".*")), "no temporary checkpoint left behind"
    assert "checkpoint saved" in (tmp_path / "log").read_text()


def test_non_finite_loss_exits_nonzero_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # lr = 1e30: the weights blow up after the first updates and the loss turns NaN a few steps later
    proc = _single_process(["--output", str(out), "--max-steps", "20", "lr=1e30", "ckpt_every=1"], tmp_path / "log")
    code = proc.wait(timeout=180)
    log = (tmp_path / "log").read_text()
    assert code == 3, log[-3000:]
    assert "non-finite" in log.splitlines()[-1]
    records = _metrics(out)
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records), "no NaN was ever logged"
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "meta.json").read_text())["step"] == records[-1]["step"] < 20


def test_a_bad_setting_is_a_one_line_error_with_exit_status_2(tmp_path):
    proc = _single_process(["--output", str(tmp_path / "run"), "mask_ratio=0.55,0.3"], tmp_path / "log")
    assert proc.wait(timeout=180) == 2
    last = (tmp_path / "log").read_text().strip().splitlines()[-1]
    assert last.startswith("error: dec_mask_ratio[1]=0.55 must be smaller than mask_ratio[1]=0.3"), last
