"""bench/estimate.py: the command as a user runs it (tiny preset, seconds) and its JSON; the FLOPs it counts on fake
tensors against the analytic count of bench/flops.py; the largest batch it reports against its own predictions
on either side; DeepSpeed's partitioning by ZeRO stage and world size; bad settings. Whether the predicted
peaks are right is tests/test_estimate_calibration.py's (against GPU measurements of the official code)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))

import estimate  # noqa: E402
from estimate import DEEPSPEED_REDUCE_BUCKET_SIZE  # noqa: E402
from flops import analytic_step_flops  # noqa: E402

from moca_fast.config import load_config  # noqa: E402
from moca_fast.fakegpu.allocator import segment_size  # noqa: E402

GIB = 1024**3
TINY = ["--preset", "tiny", "--batch-size", "8", "attention=sdpa"]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", "estimate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_command_prints_and_writes_the_prediction(tmp_path):
    out = tmp_path / "estimate.json"
    proc = _run(*TINY, "--gpu-mem", "2", "--gpu", "H100", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted peak GPU memory" in proc.stdout and "largest batch within 2 GiB" in proc.stdout
    r = json.loads(out.read_text())
    assert r["prediction"].startswith("fake-tensor prediction")
    assert sum(r["breakdown_gib"].values()) == pytest.approx(r["peak_gib"], rel=1e-9)
    # the step's products and attention, as bench/flops.py derives them from the config
    cfg = load_config("tiny", overrides=dict(batch_size=8))
    assert r["step_flops"] == pytest.approx(analytic_step_flops(cfg, 8)["total"], rel=1e-3)
    assert r["flops_per_image"] == pytest.approx(r["step_flops"] / 8)
    assert r["step_time_floor_ms"] == pytest.approx(r["step_flops"] / 766e12 * 1e3)
    assert r["img_per_s_ceiling"] == pytest.approx(8 / (r["step_time_floor_ms"] / 1e3))
    fit = r["max_batch"]
    assert fit["peak_bytes"] <= 2 < fit["next_peak_bytes"], "b fits, b + 1 does not"
    # ZeRO 2 on one rank: DeepSpeed's bf16 reduction bucket (one: the trainer turns overlap_comm off) dominates
    # this small model's peak; it is a segment of its own, rounded up to 2 MiB, whose unsplit rest (< 1 MiB) is
    # charged with it
    assert r["breakdown_gib"]["gradients"] * GIB == segment_size(2 * DEEPSPEED_REDUCE_BUCKET_SIZE)


def test_bad_settings_are_one_line_errors():
    for args, message in ((["--world-size", "0"], "--world-size=0"), (["--preset", "nope"], "unknown preset"),
                          (["--batch-size", "2", "num_new_words=4"], "exceeds the 2 images")):
        proc = _run(*TINY[:2], *args, "--no-max-batch", timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_zero_stages_partition_optimizer_state_over_the_world():
    """Per GPU: ZeRO 0 keeps the fp32 masters and AdamW's moments whole (one tensor each per parameter); ZeRO 1
    and 2 keep 1/world of them (one flat tensor each per parameter group: on this small model, the 512-byte
    blocks of ZeRO 0's many tensors make the difference at world size 1)."""
    optimizer = {}
    for zero, world in ((0, 1), (0, 4), (2, 1), (2, 4)):
        cfg = load_config("tiny", overrides=dict(batch_size=8, zero_stage=zero, attention="sdpa"))
        optimizer[zero, world] = estimate.measure(cfg, world)["breakdown"]["optimizer"]
    assert optimizer[0, 4] == optimizer[0, 1]
    assert optimizer[2, 1] == pytest.approx(optimizer[0, 1], rel=0.15)
    assert optimizer[2, 4] < 0.3 * optimizer[2, 1]


def test_deepspeed_default_bucket_size_is_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert DeepSpeedZeroConfig().reduce_bucket_size == DEEPSPEED_REDUCE_BUCKET_SIZE


def test_largest_batch_search_on_a_known_line():
    """The search against a stand-in predictor, peak = 1000 + 7 b (+ 3 at odd b): the exact answer, few probes."""
    def peak(b):
        return 1000 + 7 * b + 3 * (b % 2)

    cfg = load_config("tiny", overrides=dict(batch_size=8))
    first = {"batch_size": 8, "peak_bytes": peak(8), "breakdown": dict.fromkeys(
        ("parameters", "buffers", "optimizer", "workspace"), 250)}
    for limit in (1500, 5000, 5003, 1055):
        fit = estimate.largest_batch(cfg, 1, limit, first, probe=lambda c, w: {"peak_bytes": peak(c.batch_size)})
        b = fit["batch_size"]
        assert peak(b) <= limit < peak(b + 1) and all(peak(x) > limit for x in range(b + 1, b + 10))
        assert fit["probes"] <= 6
    fit = estimate.largest_batch(cfg, 1, 900, first, probe=lambda c, w: {"peak_bytes": peak(c.batch_size)})
    assert fit["batch_size"] is None and "does not fit" in fit["reason"]


def test_gradient_accumulation_keeps_the_gradients_through_later_micro_steps():
    """ZeRO 0 accumulates in param.grad, ZeRO 2 in its partition's buffer: either lives through the second
    micro-step's forward, where this small model peaks; the step's FLOPs double."""
    for zero in (0, 2):
        one, two = (estimate.measure(load_config("tiny", overrides=dict(
            batch_size=64, zero_stage=zero, grad_accum=accum, attention="sdpa")), 1) for accum in (1, 2))
        assert two["breakdown"]["gradients"] > one["breakdown"]["gradients"], zero
        assert two["step_flops"] == 2 * one["step_flops"]
