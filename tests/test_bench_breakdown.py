"""The profile's categories (bench/step_profile.py's breakdown) on hand-built traces: the GPU path (which the CPU CI cannot record) and the CPU path.

The GPU trace mimics torch.profiler's Chrome export: kernels link to their launching aten op by
args["External id"] and to the host launch call by args["correlation"]; record_function ranges are
"user_annotation" events.
"""
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

from step_profile import CATEGORIES, OPTIMIZER_RANGES, breakdown, classify  # noqa: E402


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur, "args": args}


def _gpu_trace(optimizer_range="bench.optimizer"):
    """One step over [0, 100) us on the host; GPU work in us: GEMM 10, attention 5, LayerNorm 4,
    fused loss 6, GELU 3, optimiser 7, the synthetic batch's randn 1; a host sync in the step."""
    ev = [_x("user_annotation", "bench.step", 0, 100),
          _x("user_annotation", "bench.data", 0, 20),
          _x("user_annotation", optimizer_range, 70, 25)]
    launches = [  # (op name, op External id, launch ts, kernel name, kernel ts, kernel dur)
        ("aten::randn", 1, 2, "void at::native::distribution_elementwise_grid_stride_kernel", 30, 1),
        ("aten::addmm", 2, 22, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 31, 10),
        ("aten::_scaled_dot_product_flash_attention", 3, 24, "pytorch_flash::flash_fwd_kernel", 41, 5),
        ("aten::native_layer_norm", 4, 26, "void at::native::vectorized_layer_norm_kernel", 46, 4),
        ("moca_fast::soft_target_kl", 5, 28, "_kl_fwd_kernel", 50, 6),
        ("CompiledFunction", 6, 30, "triton_poi_fused_gelu_0", 56, 3),
        ("aten::_fused_adamw_", 7, 72, "void at::native::multi_tensor_apply_kernel", 80, 7),
    ]
    for i, (op, ext, ts, kname, kts, kdur) in enumerate(launches):
        ev.append(_x("cpu_op", op, ts, 1, **{"External id": ext}))
        ev.append(_x("cuda_runtime", "cudaLaunchKernel", ts + 0.5, 0.2, correlation=100 + i))
        ev.append(_x("kernel", kname, kts, kdur, **{"External id": ext, "correlation": 100 + i}))
    ev.append(_x("cuda_runtime", "cudaStreamSynchronize", 60, 5))
    ev.append({"ph": "s", "cat": "fwdbwd", "name": "fwdbwd", "ts": 3})  # not a complete event: ignored
    return {"traceEvents": ev}


@pytest.mark.parametrize("optimizer_range", OPTIMIZER_RANGES)  # the benches' step and the trainer's
def test_gpu_trace_categories(optimizer_range):
    r = breakdown(_gpu_trace(optimizer_range), steps=1)
    ms = {c: round(v * 1e3, 6) for c, v in r["ms_per_step"].items()}  # back to us
    # window [0, 100): busy 36 us, idle gaps [0,30) (20 us of it while fetching data), [59,80), [87,100)
    assert ms == {"GEMM": 10, "attention": 5, "normalisation": 4, "loss kernels": 6, "elementwise": 3,
                  "optimiser": 7, "data wait": 1 + 20, "idle": 100 - 36 - 20}
    assert r["window_ms"] == pytest.approx(0.1)
    assert sum(r["pct"].values()) == pytest.approx(100.0)
    assert r["host_syncs_per_step"] == 1 and r["gpu_events"] == 7


def test_cpu_trace_uses_self_time():
    ev = [_x("user_annotation", "bench.step", 0, 100),
          _x("user_annotation", "bench.data", 0, 8), _x("cpu_op", "aten::randn", 1, 2),  # waits 6 for workers
          _x("cpu_op", "aten::linear", 10, 30), _x("cpu_op", "aten::addmm", 12, 25),  # linear's self: 5
          _x("cpu_op", "aten::native_layer_norm", 50, 10),
          _x("cpu_op", "aten::add", 70, 4)]
    r = breakdown({"traceEvents": ev}, steps=2)
    us = {c: round(v * 1e3 * 2, 6) for c, v in r["ms_per_step"].items()}
    assert us["GEMM"] == 30 and us["normalisation"] == 10 and us["elementwise"] == 4 and us["data wait"] == 8
    assert us["idle"] == 100 - 52


def test_classify_examples():
    assert classify("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "") == "attention"
    assert classify("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "aten::mm") == "GEMM"
    assert classify("triton_per_fused_add_native_layer_norm_3", "") == "normalisation"
    assert classify("", "aten::_log_softmax_backward_data") == "loss kernels"
    assert classify("void at::native::elementwise_kernel", "aten::mul") == "elementwise"
    assert classify("anything", "aten::mm", in_optimizer=True) == "optimiser"
    assert set(CATEGORIES) >= {"GEMM", "attention", "normalisation", "loss kernels", "elementwise",
                               "optimiser", "data wait", "idle"}


def test_trace_without_step_range_is_an_error():
    with pytest.raises(ValueError, match="no bench.step range"):
        breakdown({"traceEvents": [_x("cpu_op", "aten::mm", 0, 1)]}, steps=1)
