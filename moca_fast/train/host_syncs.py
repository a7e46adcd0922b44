"""Host synchronisations of the optimiser path (engine.backward + engine.step), by ZeRO stage and precision.

A host sync (a device value read on the host: `.item()`, `bool(tensor)`, a device-wide synchronize) makes the
host wait for the GPU, so the host can no longer queue work ahead of it. Read from DeepSpeed 0.19.8's code and
counted by tests/test_host_syncs.py on the CPU (gloo, tiny preset; `aten::_local_scalar_dense` and the
accelerator's synchronize, torch AdamW's host-side step counters not counted). Per optimiser step on a GPU,
with G parameter groups (4) and P student parameter tensors (tiny 72, vit_base_dec2 192, vit_large_dec2 336):

- ZeRO 0, fp32 (torch AdamW, fused on CUDA): none; DeepSpeed's clip coefficient stays on the device.
- ZeRO 0, bf16 (FP16_UnfusedOptimizer): 1 + 2G = 9: the overflow check, one (`batch_overflow_check`; DeepSpeed's
  own reads one flag per parameter tensor, P + 1), then per group the grad norm, read as a float for the clip.
- ZeRO 1 or 2, fp32 (DeepSpeedZeroOptimizer): 1 + G = 5: the global grad norm checked for inf/NaN in step(),
  then again per group in unscale_and_clip_grads.
- ZeRO 1 or 2, bf16: 2 + G = 6: the same, after the overflow flag (bf16.check_grad_overflow, DeepSpeed's default).
The other micro-steps of a gradient accumulation read none.

Avoided by the generated DeepSpeed config (moca_fast.train.engine), all stages; arithmetic unchanged:
- `timers.throughput.enabled: false`: DeepSpeed's throughput timer synchronises the device at every forward's
  start and every step()'s end (2 device-wide syncs per micro-step, from the third optimiser step) to time a
  report it prints every steps_per_print steps, which we set to never;
- `zero_optimization.overlap_comm: false`: with overlap_comm DeepSpeed synchronises the device at the end of
  each gradient reduction epilogue (ZeRO 2: every micro-step; ZeRO 1: every optimiser step). It overlaps a
  bucket's reduction with the rest of the backward only when the gradients fill more than one bucket
  (reduce_bucket_size, 5e8 elements): our students (ViT-B 97 M, ViT-L 318 M parameters) fill one, reduced
  after the backward anyway. It also allocates a second bucket (5e8 elements: 0.93 GiB in bf16). Same results
  bit for bit on 2 CPU ranks, ZeRO 1 and 2, bf16, gradient accumulation 2 (checked when this was written).
Not avoided: the syncs listed above, which DeepSpeed's control flow needs (skip a step on an overflow, clip
with a host-side coefficient) and which no DeepSpeed option removes without also removing the overflow skip
(bf16.check_grad_overflow: false) or the clipping; after the first, each waits only for the kernels queued
since the previous one. A user --deepspeed_config may set any of these keys back.
On a GPU (not measured yet): bench/device_check.sh counts each trainer variant's host syncs per step (column
syncs/step, forward included) and times trainer_fast and trainer_fast_zero0 again with the timer and ZeRO 0's
per-parameter check put back (column x DS dflt).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("moca_fast.train")


def batch_overflow_check(optimizer) -> bool:
    """ZeRO 0 bf16: DeepSpeed's FP16_UnfusedOptimizer checks its gradients for inf/NaN one parameter tensor at a
    time, each check a host sync (P + 1 per step: 193 at ViT-B, each after six small kernels). This replaces
    that check, on this optimiser's checker only, by one foreach max-norm over all gradients (NaN-propagating:
    non-finite exactly when a gradient has an inf or a NaN, DeepSpeed's criterion) read once: the same skip
    decision, one sync. Applied only where DeepSpeed's check is local (no MoE, model-parallel or
    reduce-scatter all-reduce of the flag); returns whether it was applied."""
    checker = getattr(optimizer, "overflow_checker", None)
    if type(optimizer).__name__ != "FP16_UnfusedOptimizer" or checker is None or checker.params is None:
        return False
    if checker.has_moe_params or checker.mpu is not None or checker.zero_reduce_scatter:
        return False
    engine = checker.deepspeed
    original = checker.has_overflow

    def has_overflow(params, has_moe_params=None):
        if has_moe_params or (engine is not None and engine.enable_backward_allreduce is False):
            return original(params, has_moe_params=has_moe_params)  # DeepSpeed all-reduces the flag there
        grads = [p.grad.data for p in params if p.grad is not None]
        if not grads:
            return False
        largest = torch.stack(torch._foreach_norm(grads, float("inf")))
        return not bool(torch.isfinite(largest).all())

    checker.has_overflow = has_overflow
    return True


def reduce_host_syncs(engine) -> None:
    """Applies `batch_overflow_check` to the engine's optimiser where it fits, and logs it."""
    if batch_overflow_check(engine.optimizer):
        log.info("DeepSpeed's bf16 ZeRO-0 overflow check: one host sync per step instead of one per parameter")
