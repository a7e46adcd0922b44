"""The training steps the benchmarks compare: one full MOCA step per call.

A step: teacher EMA -> teacher targets -> student (two masking rounds) -> losses -> backward ->
grad-norm clip 0.1 -> AdamW -> codebook update (inside the model's forward), under bf16 autocast on
the input views cast to bf16 (as the trainer feeds them). Variants:
- reference: the official-equivalent path: fp32 weights, eager PyTorch, torch AdamW (foreach);
- fast: bf16 weights with fp32 masters, the fused Triton loss kernels, compiled blocks, the patch
  embedding as a GEMM, fused AdamW (moca_fast.model.fastpath);
- fast_eager: fast without torch.compile (what compilation adds);
- fast_reference_losses: fast with the PyTorch losses (what the fused kernels add).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function

from moca_fast.config import Config
from moca_fast.model.fastpath import FastOptions, MixedPrecisionAdamW, prepare_fast
from moca_fast.model.moca import MOCA
from moca_fast.train.schedules import Schedules, apply_schedules, parameter_groups


@dataclass(frozen=True)
class VariantSpec:
    impl: str
    fast: FastOptions | None
    fused_adamw: bool
    summary: str


VARIANTS = {
    "reference": VariantSpec("reference", None, False, "eager, fp32 weights, torch AdamW"),
    "fast": VariantSpec("fast", FastOptions(), True, "bf16 weights, fused kernels, compiled blocks, fused AdamW"),
    "fast_eager": VariantSpec("fast", FastOptions(compile_blocks=False), True, "fast without torch.compile"),
    "fast_reference_losses": VariantSpec("reference", FastOptions(), True, "fast with PyTorch losses"),
}


class VariantUnavailable(RuntimeError):
    """The variant cannot run here (e.g. the fused kernels do not import); the message says why."""


def fused_kernels_missing(device: torch.device) -> str | None:
    """Why impl=fast cannot run its Triton kernels here, or None when it can."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU the Triton kernels need TRITON_INTERPRET=1 (else impl=fast runs the PyTorch reference)"
    try:
        import moca_fast.kernels.codebook_assign  # noqa: F401
        import moca_fast.kernels.soft_ce  # noqa: F401
    except Exception as e:  # ImportError while the kernels are missing; anything a broken module raises
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return None


def variant_spec(name: str, compile_blocks: bool) -> VariantSpec:
    """The variant's spec, with torch.compile switched off when compile_blocks is False."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    spec = VARIANTS[name]
    if spec.fast is not None and not compile_blocks:
        spec = replace(spec, fast=replace(spec.fast, compile_blocks=False))
    return spec


class TrainStep:
    """A model and optimiser of one variant; calling it runs one full training step.

    x1, x2: float32 [B, 3, H, W] views on the device. Returns the detached loss (no host sync).
    """

    def __init__(self, name: str, cfg: Config, device: torch.device, compile_blocks: bool = True):
        spec = variant_spec(name, compile_blocks)
        if spec.impl == "fast" and (missing := fused_kernels_missing(device)):
            raise VariantUnavailable(missing)
        self.name, self.spec, self.device = name, spec, device
        self.model = MOCA(cfg.replace(impl=spec.impl), world_size=1).to(device).train()
        if spec.fast is not None:
            prepare_fast(self.model, spec.fast)
        schedules = Schedules.from_config(cfg, world_size=1)
        groups = parameter_groups(self.model, MOCA.GENERATOR_PREFIXES)
        apply_schedules(groups, schedules, epoch=cfg.warmup_epochs)  # the peak learning rate
        self.momentum = schedules.momentum(cfg.warmup_epochs)
        self.optimizer = MixedPrecisionAdamW(groups, cfg.clip_grad, fused=spec.fused_adamw,
                                             betas=tuple(cfg.adam_betas))
        self.attention_backend = self.model.attention_backend

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with record_function("bench.forward"), torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss, _ = self.model(x1.to(torch.bfloat16), x2.to(torch.bfloat16), self.momentum)
        with record_function("bench.backward"):
            loss.backward()
        with record_function("bench.optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad()
        return loss.detach()


class Batches:
    """Endless (x1, x2) batches: the synthetic backend, or the real loader of cfg.data; each fetch is
    annotated "bench.data" for the profile."""

    def __init__(self, cfg: Config, device: torch.device):
        from moca_fast.data import build_train_loader

        self.loader = build_train_loader(cfg, device=device)
        self.backend = self.loader.backend
        self._epoch = 0
        self._it = iter(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        with record_function("bench.data"):
            try:
                return next(self._it)
            except StopIteration:
                self._epoch += 1
                self.loader.set_epoch(self._epoch)
                self._it = iter(self.loader)
                return next(self._it)
