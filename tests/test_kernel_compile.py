"""The target compile check (bench/compile.py): every Triton kernel of the fast path, compiled ahead of time for
sm_90a at the trainer's ViT-B/16 batch-256 launch parameters in bf16 and fp32, with triton's own compiler and
the wheel's ptxas / cuobjdump. Runs in CI (no GPU needed). Fails on a compile failure, a spill in a bf16 kernel,
shared memory over sm_90's 227 KiB, or a bf16 kernel whose dots do not lower to wgmma.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from triton.runtime import KernelInterface

from moca_fast.kernels import codebook_assign, soft_ce

ROOT = Path(__file__).resolve().parents[1]
# bench/compile.py, loaded by path: putting bench/ on sys.path would shadow the stdlib's `profile`
_spec = importlib.util.spec_from_file_location("bench_compile", ROOT / "bench" / "compile.py")
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)


def fast_path_kernels() -> set[str]:
    """Every Triton kernel defined in the fast path's kernel modules."""
    return {name for module in (soft_ce, codebook_assign) for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and name.endswith("_kernel")}


def test_every_kernel_compiles_for_sm90_without_spills_or_mma_sync(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile.py"), "--json", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout[-6000:], done.stderr[-3000:])
    results = json.loads(out.read_text())
    assert aot.problems(results) == [], "\n".join(aot.problems(results))
    assert done.returncode == 0
    covered = {(r["kernel"], dtype) for r in results for dtype in r["dtypes"]}
    kernels = fast_path_kernels()
    assert kernels == {"_kl_fwd_kernel", "_token_stats_kernel", "_bow_kernel"}
    missing = {(k, d) for k in kernels for d in ("bf16", "fp32")} - covered
    assert not missing, f"not compiled: {sorted(missing)}"
    cases = {c for r in results for c in r["cases"]}
    assert cases == {"assign", "image_loss r1", "image_loss r2", "dense_loss r1", "dense_loss r2"}
    for r in results:
        assert r["ok"] and r["regs"] <= 255 and r["num_warps"] in (4, 8, 16), r


def test_problems_names_each_rejected_result():
    good = {"kernel": "k", "variant": "", "cases": ["c"], "dtypes": ["bf16"], "ok": True, "error": None, "regs": 64,
            "spill_bytes": 0, "shared_bytes": 1024, "num_warps": 4, "num_stages": 3, "dots": True, "wgmma": True}
    bad = [dict(good, ok=False, error="Assertion failed"), dict(good, spill_bytes=8), dict(good, wgmma=False),
           dict(good, shared_bytes=aot.SM90_SHARED_LIMIT + 1)]
    assert aot.problems([good, dict(good, dtypes=["fp32"], spill_bytes=8, wgmma=False)]) == []
    found = aot.problems(bad)
    assert [("compile" in f, "spills" in f, "wgmma" in f, "shared" in f) for f in found] == [
        (True, False, False, False), (False, True, False, False), (False, False, True, False),
        (False, False, False, True)]
