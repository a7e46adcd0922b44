"""The trainer's forward as it runs on a GPU, traced on fake CUDA tensors (moca_fast.fakegpu; no GPU needed).

The model is prepared as `build_engine` prepares it for a CUDA run (the fast-path pieces of
`trainer_fast_options`, minus torch.compile, which needs the GPU; DeepSpeed's bf16 cast with the teacher and the
codebook kept fp32), the views arrive in bf16 as `train_step` casts them, and the teacher runs under CUDA's
bf16 autocast. The trace fails on: a host read of a device value (.item(), int(), bool(), a Python branch on a
tensor), any op touching a tensor off the GPU (.cpu(), a tensor created without device=), a fused op not
called or called with other dtypes than intended, i.e. the fast path falling back to its PyTorch reference.
The last tests check that each of those faults, planted in a small model, is caught.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import moca_fast.model.moca as moca_module
from moca_fast.config import load_config
from moca_fast.fakegpu import HostSyncError, convert_module, fake_cuda
from moca_fast.fakegpu.trace import StepTrace
from moca_fast.model.fastpath import prepare_fast, trainer_fast_options
from moca_fast.model.moca import MOCA
from moca_fast.train.engine import FP32_SUBMODULES

BF16, FP32, INT64 = torch.bfloat16, torch.float32, torch.int64
#: the intended dtypes at the fused ops' boundaries in the trainer's bf16 step (fast path), in call order
CODEBOOK_ASSIGN = ("moca_fast::codebook_assign",
                   {"tokens": FP32, "words": FP32, "inv_temp": FP32, "interior": INT64, "dot_dtype": BF16}, (FP32, FP32))
IMAGE_LOSS = ("moca_fast::soft_target_kl",
              {"features": BF16, "prototypes": BF16, "target": FP32, "f_dot": BF16, "x_dot": FP32}, (FP32,) * 3)
DENSE_LOSS = ("moca_fast::soft_target_kl",
              {"features": BF16, "prototypes": BF16, "teacher_tokens": BF16, "dec_ids": INT64, "words": FP32,
               "inv_temp": FP32, "f_dot": BF16, "x_dot": BF16}, (FP32,) * 3)
FAST_CALLS = [CODEBOOK_ASSIGN, CODEBOOK_ASSIGN, IMAGE_LOSS, DENSE_LOSS, IMAGE_LOSS, DENSE_LOSS]


def trace_forward(impl: str, preset: str = "vit_base_dec2", batch: int = 256) -> tuple[StepTrace, dict]:
    """One training forward (with the teacher EMA and the codebook update) of the trainer's model on fake CUDA
    tensors; returns the trace and the outputs' dtypes."""
    cfg = load_config(preset, overrides=dict(impl=impl, batch_size=batch, num_new_words=min(batch, 32)))
    with fake_cuda(), torch.device("cuda"):
        model = MOCA(cfg, 1)
        options = trainer_fast_options(cfg, torch.device("cuda"))
        if options is not None:
            prepare_fast(model, dataclasses.replace(options, compile_blocks=False))
        convert_module(model.train(), device="cuda", dtype=BF16, keep_dtype=FP32_SUBMODULES)
        x1, x2 = (torch.randn(batch, 3, cfg.img_size, cfg.img_size).to(BF16) for _ in range(2))
        with StepTrace() as trace:
            loss, parts = model(x1, x2, momentum=0.996, update_teacher=True)
            terms = torch.stack([loss.detach(), parts["img"], parts["loc"]]).float()
    return trace, {"loss": loss.dtype, "terms": terms.dtype, "device": terms.device.type}


def problems(trace: StepTrace, impl: str) -> list[str]:
    """What the trace shows that a GPU step must not do."""
    found = [f"off the GPU: {where}" for where in trace.off_device]
    want = FAST_CALLS if impl == "fast" else []
    got = [(c.op, c.inputs, c.outputs) for c in trace.fused_calls]
    if len(got) != len(want):
        found.append(f"{len(got)} fused-op calls, expected {len(want)} ({[c[0] for c in got]})")
    for i, ((op, inputs, outputs), (want_op, want_inputs, want_outputs)) in enumerate(zip(got, want)):
        wrong = {k: (inputs.get(k), v) for k, v in want_inputs.items() if inputs.get(k) != v}
        if op != want_op or wrong or outputs != want_outputs:
            found.append(f"fused call {i} {op}: (got, intended) {wrong}, outputs {outputs} vs {want_outputs}")
    return found


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_vit_b_batch_256_forward_stays_on_the_gpu_without_host_syncs(impl):
    trace, out = trace_forward(impl)
    assert problems(trace, impl) == []
    assert out == {"loss": FP32, "terms": FP32, "device": "cuda"}


# ---------------------------------------------------------------------------------- the trace can fail (tiny model)
def _plant(monkeypatch, fault):
    """Wraps the model's image loss: `fault(avg)` runs inside the forward, on the student's [AVG] features."""
    original = moca_module.image_loss

    def image_loss(avg, *args):
        return original(fault(avg), *args)

    monkeypatch.setattr(moca_module, "image_loss", image_loss)


@pytest.mark.parametrize("fault", [
    lambda avg: avg if avg.sum().item() == avg.sum().item() else avg,  # .item()
    lambda avg: avg * 2 if avg.amax() > 0 else avg,  # a Python branch on a device value
    lambda avg: avg + float(avg.mean()),  # float(tensor)
], ids=["item", "branch", "float"])
def test_a_host_read_in_the_forward_fails_the_trace(monkeypatch, fault):
    _plant(monkeypatch, fault)
    with pytest.raises(HostSyncError, match="read on the host"):
        trace_forward("fast", "tiny", 8)


@pytest.mark.parametrize("fault", [
    lambda avg: avg.cpu().to(avg.device),  # a round trip through the host
    lambda avg: avg + torch.ones(avg.shape[1], device="cpu").to(avg.device),  # a tensor made on the CPU
], ids=["cpu", "cpu_tensor"])
def test_a_tensor_off_the_gpu_fails_the_trace(monkeypatch, fault):
    _plant(monkeypatch, fault)
    trace, _ = trace_forward("fast", "tiny", 8)
    assert any(p.startswith("off the GPU") for p in problems(trace, "fast"))


def test_a_dtype_change_at_a_fused_op_fails_the_trace(monkeypatch):
    _plant(monkeypatch, lambda avg: avg.float())
    trace, _ = trace_forward("fast", "tiny", 8)
    assert any("'features': (torch.float32, torch.bfloat16)" in p for p in problems(trace, "fast"))


def test_a_fused_op_falling_back_to_its_reference_fails_the_trace(monkeypatch):
    import moca_fast.kernels.soft_ce as soft_ce

    monkeypatch.setattr(soft_ce, "runs_triton", lambda *args: False)
    trace, _ = trace_forward("fast", "tiny", 8)
    assert any("2 fused-op calls, expected 6" in p for p in problems(trace, "fast"))


def test_the_small_model_without_a_planted_fault_traces_clean():
    """The control of the tests above: what they detect is the planted fault."""
    trace, out = trace_forward("fast", "tiny", 8)
    assert problems(trace, "fast") == []
