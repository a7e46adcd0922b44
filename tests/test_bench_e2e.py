"""The end-to-end benchmarks' CPU smoke runs (--small), as a user runs them, and their JSON.

`python -m bench throughput` and `python -m bench profile` run as subprocesses on the tiny preset (Triton kernels
under the interpreter); the JSON must hold every field with finite, positive numbers, and the
FLOPs counted by torch.utils.flop_counter over one training step must equal the analytic count of
the step's matrix products and attention (bench/flops.py) to 0.1 %: the analytic count covers
every product the counter sees, so any gap means the step computes something it should not (e.g. a
backward through the teacher) or misses a part.
"""
import gzip
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))

from flops import analytic_step_flops  # noqa: E402

from moca_fast.config import load_config  # noqa: E402

# --small: no compilation, so no fast_eager
VARIANTS = ("reference", "fast", "fast_reference_losses", "trainer", "trainer_fast")


def _run(args, timeout=600):  # a bound, generous: 41 s of CPU took 268 s wall on the shared 2 cores
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    proc = _run(["-m", "bench", "throughput", "--small", "--out", str(out)])
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    proc = _run(["-m", "bench", "profile", "--small", "--out", str(folder / "profile.json")])
    return json.loads((folder / "profile.json").read_text()), proc.stdout, folder


def test_throughput_json_fields(throughput):
    report, stdout = throughput
    assert report["settings"]["device"] == "cpu" and report["settings"]["preset"] == "tiny"
    assert report["env"]["triton_interpret"] == "1" and report["fast_kernels"] == "ok"
    assert _positive(report["peak_tflops"]) and _positive(report["flops_per_img"])
    assert set(report["variants"]) == set(VARIANTS)
    for name, r in report["variants"].items():
        assert r["status"] == "ok", f"{name}: {r['status']}"
        for key in ("img_per_s", "step_ms_median", "step_ms_min", "mfu", "achieved_tflops", "peak_mem_gib",
                    "speedup_vs_reference"):
            assert _positive(r[key]), f"{name}.{key} = {r.get(key)}"
        assert math.isfinite(r["loss"]) and r["attention_backend"] == "sdpa"
        assert len(r["step_ms"]) == report["settings"]["timed_steps"]
        assert r["img_per_s"] == pytest.approx(report["settings"]["batch_size"] / r["step_ms_median"] * 1e3)
    # the table comes last
    assert stdout.rstrip().splitlines()[-1].startswith("trainer_fast")


def test_counted_flops_match_analytic(throughput):
    report, _ = throughput
    s = report["settings"]
    cfg = load_config(s["preset"], overrides=dict(img_size=32, skip_offset=1, batch_size=s["batch_size"],
                                                  num_new_words=2))
    analytic = analytic_step_flops(cfg, s["batch_size"])
    assert report["analytic_flops_by_part"] == analytic
    assert abs(report["flops_per_step"] - analytic["total"]) <= 1e-3 * analytic["total"]
    dominant = analytic["teacher"] + analytic["student_encoder"] + analytic["decoder"]
    assert dominant > 0.5 * analytic["total"]


def test_analytic_flops_near_design_figure():
    """ViT-B/16 at batch 256: DESIGN §4 states 245 GFLOP per image pair (measured on the official code
    and rounded); the analytic count must land within 2 % of it."""
    cfg = load_config("vit_base_dec2")
    per_img = analytic_step_flops(cfg, 256)["total"] / 256
    assert abs(per_img - 245e9) <= 0.02 * 245e9


def test_profile_json_and_traces(profile):
    report, stdout, folder = profile
    assert report["time_base"] == "CPU op self time"
    for name in ("reference", "fast"):
        r = report["variants"][name]
        assert r["status"] == "ok", f"{name}: {r['status']}"
        assert set(r["ms_per_step"]) == {"GEMM", "attention", "normalisation", "loss kernels", "elementwise",
                                         "optimiser", "data wait", "idle"}
        assert all(math.isfinite(v) and v >= 0 for v in r["ms_per_step"].values())
        assert sum(r["pct"].values()) == pytest.approx(100.0, abs=1.0)  # the categories partition the window
        for category in ("GEMM", "attention", "normalisation", "elementwise", "optimiser"):
            assert r["ms_per_step"][category] > 0, f"{name}: no {category} time"
        with gzip.open(folder / f"{name}.trace.json.gz", "rt") as f:
            assert json.load(f)["traceEvents"]
    # the fused loss kernels (custom ops, interpreted here) are what the fast path spends its loss time in
    assert report["variants"]["fast"]["ms_per_step"]["loss kernels"] > 0
    assert "host syncs / step" in stdout.rstrip().splitlines()[-1]


def test_missing_kernels_reported_not_fatal(tmp_path):
    """Before the fused kernels exist (or when they do not import), fast reports why; the rest runs."""
    out = tmp_path / "t.json"
    script = textwrap.dedent(f"""
        import runpy, sys
        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name == "moca_fast.kernels.soft_ce":
                    raise ImportError("No module named 'moca_fast.kernels.soft_ce'")
        sys.meta_path.insert(0, Missing())
        sys.argv = ["throughput.py", "--small", "--variants", "reference,fast", "--steps", "1", "--out", {str(out)!r}]
        sys.path.insert(0, "bench")
        runpy.run_path("bench/throughput.py", run_name="__main__")
    """)
    proc = _run(["-c", script])
    report = json.loads(out.read_text())
    assert report["variants"]["reference"]["status"] == "ok"
    assert report["variants"]["fast"] == {"status": "unavailable: ImportError: No module named "
                                                    "'moca_fast.kernels.soft_ce'"}
    assert report["fast_kernels"].startswith("ImportError")
    assert "unavailable: ImportError" in proc.stdout
