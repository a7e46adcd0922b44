"""The training steps the benchmarks compare: one full MOCA step per call.

A step: teacher EMA -> teacher targets -> student (two masking rounds) -> losses -> backward ->
grad-norm clip 0.1 -> AdamW -> codebook update (inside the model's forward). Variants:
- reference: the official-equivalent path: fp32 weights under bf16 autocast, eager PyTorch, torch
  AdamW (foreach);
- fast: bf16 weights with fp32 masters, the fused Triton kernels, compiled blocks, the patch
  embedding as a GEMM, fused AdamW (moca_fast.model.fastpath), under bf16 autocast;
- fast_eager: fast without torch.compile (what compilation adds);
- fast_reference_losses: fast with the PyTorch losses (what the fused kernels add);
- trainer, trainer_fast: the trainer's own step (moca_fast.train.step.train_step) on the DeepSpeed
  engine that `deepspeed launch/train.py` builds (ZeRO-2, bf16 weights with fp32 masters, fused
  AdamW on CUDA, no autocast) with impl=reference / impl=fast and the trainer's fast-path pieces:
  what a user's run gets, DeepSpeed's own costs included. They need deepspeed to import;
- trainer_zero0, trainer_fast_zero0: the same with zero_stage=0 (no partitioning: DeepSpeed's bf16
  optimiser wrapper over the whole model, no per-parameter ZeRO bookkeeping). Not in the default
  list; bench/device_check.sh names them. trainer_fast and trainer_fast_zero0 are timed a second time
  with the DeepSpeed defaults the trainer turns off put back (TrainerStep.deepspeed_defaults);
- trainer_fast_keep: trainer_fast with activation_memory_budget=1.0 (the compiled blocks keep their
  LayerNorm and GELU outputs instead of recomputing them in the backward, the 0.8 default: more memory,
  less work).
The views arrive as float32 and are cast to bf16 in the step, as the trainer does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function

from common import first_line
from moca_fast.config import Config
from moca_fast.model.fastpath import FastOptions, MixedPrecisionAdamW, prepare_fast
from moca_fast.model.moca import MOCA
from moca_fast.train.schedules import Schedules, apply_schedules, parameter_groups
from moca_fast.train.step import LossTotals, train_step


@dataclass(frozen=True)
class VariantSpec:
    impl: str
    fast: FastOptions | None
    fused_adamw: bool
    summary: str
    trainer: bool = False
    zero_stage: int = 2  # the trainer variants' ZeRO stage
    deepspeed_defaults: bool = False  # also time it with DeepSpeed's own host syncs back (TrainerStep)


VARIANTS = {
    "reference": VariantSpec("reference", None, False, "eager, fp32 weights, torch AdamW"),
    "fast": VariantSpec("fast", FastOptions(), True, "bf16 weights, fused kernels, compiled blocks, fused AdamW"),
    "fast_eager": VariantSpec("fast", FastOptions(compile_blocks=False), True, "fast without torch.compile"),
    "fast_reference_losses": VariantSpec("reference", FastOptions(), True, "fast with PyTorch losses"),
    "trainer": VariantSpec("reference", None, True, "the trainer's DeepSpeed step, impl=reference", trainer=True),
    "trainer_fast": VariantSpec("fast", FastOptions(bf16_weights=False), True,
                                "the trainer's DeepSpeed step, impl=fast", trainer=True, deepspeed_defaults=True),
    "trainer_fast_keep": VariantSpec("fast", FastOptions(bf16_weights=False, activation_memory_budget=1.0),
                                     True, "trainer_fast, activation_memory_budget=1.0", trainer=True),
    "trainer_zero0": VariantSpec("reference", None, True, "trainer with zero_stage=0", trainer=True, zero_stage=0),
    "trainer_fast_zero0": VariantSpec("fast", FastOptions(bf16_weights=False), True,
                                      "trainer_fast with zero_stage=0", trainer=True, zero_stage=0,
                                      deepspeed_defaults=True),
}
#: what every variant computes in
PRECISION = "bf16 (autocast over fp32 or bf16 weights; the trainer variants: DeepSpeed's bf16 weights)"
#: variants that differ from another (fast, trainer_fast) only when the blocks are compiled
COMPILE_ONLY = ("fast_eager", "trainer_fast_keep")
#: variants run only when named (--variants)
ON_REQUEST = ("trainer_zero0", "trainer_fast_zero0")


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
        return first_line(e)
    return None


def variant_spec(name: str, compile_blocks: bool) -> VariantSpec:
    """The variant's spec, with torch.compile switched off when compile_blocks is False."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    spec = VARIANTS[name]
    if spec.fast is not None and not compile_blocks:
        spec = replace(spec, fast=replace(spec.fast, compile_blocks=False))
    return spec


def make_step(name: str, cfg: Config, device: torch.device, compile_blocks: bool = True):
    """The step of variant `name`: a TrainStep, or a TrainerStep for the trainer variants.

    Calling it with float32 views x1, x2 [B, 3, H, W] on the device runs one full training step and
    returns the detached loss (no host sync). Raises VariantUnavailable when it cannot run here.
    """
    spec = variant_spec(name, compile_blocks)
    if spec.impl == "fast" and (missing := fused_kernels_missing(device)):
        raise VariantUnavailable(missing)
    return (TrainerStep if spec.trainer else TrainStep)(spec, cfg, device)


def _at_peak_learning_rate(param_groups: list[dict], cfg: Config) -> float:
    """Sets the groups' lr and wd to the schedules' values at the end of the warm-up (the peak
    learning rate); returns the teacher momentum there."""
    schedules = Schedules.from_config(cfg, world_size=1)
    apply_schedules(param_groups, schedules, cfg.warmup_epochs)
    return schedules.momentum(cfg.warmup_epochs)


class TrainStep:
    """The benches' standalone step: a model and a MixedPrecisionAdamW, under bf16 autocast."""

    def __init__(self, spec: VariantSpec, cfg: Config, device: torch.device):
        self.spec, self.device = spec, device
        self.model = MOCA(cfg.replace(impl=spec.impl), world_size=1).to(device).train()
        if spec.fast is not None:
            prepare_fast(self.model, spec.fast)
        groups = parameter_groups(self.model, MOCA.GENERATOR_PREFIXES)
        self.momentum = _at_peak_learning_rate(groups, cfg)
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


class TrainerStep:
    """The trainer's step: build_engine and train_step exactly as moca_fast.train.loop uses them, on a
    one-rank process group (NCCL on CUDA, gloo on the CPU), bf16, the spec's ZeRO stage."""

    def __init__(self, spec: VariantSpec, cfg: Config, device: torch.device):
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise VariantUnavailable(f"deepspeed does not import ({first_line(e)})") from None
        from moca_fast.train.engine import build_engine, init_distributed

        dist_info = init_distributed()
        if dist_info.device.type != device.type:
            raise VariantUnavailable(f"the trainer picks {dist_info.device}, the benchmark runs on {device}")
        fast = spec.fast or FastOptions(compile_blocks=False)
        cfg = cfg.replace(impl=spec.impl, compile_blocks="on" if fast.compile_blocks else "off",
                          activation_memory_budget=fast.activation_memory_budget, precision="bf16",
                          zero_stage=spec.zero_stage)
        self.spec, self.device = spec, device
        self.engine, _ = build_engine(MOCA(cfg, world_size=1), cfg, dist_info, "bf16")
        self.attention_backend = self.engine.module.attention_backend
        self.momentum = _at_peak_learning_rate(self.engine.optimizer.param_groups, cfg)
        self.totals = LossTotals(device)

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return train_step(self.engine, iter([(x1, x2)]), self.momentum, torch.bfloat16, self.totals)[0]

    def deepspeed_defaults(self) -> None:
        """Puts back, on this engine, the DeepSpeed defaults the trainer turns off that a running engine can take
        (moca_fast.train.host_syncs): the synchronising throughput timer (it syncs from its third step) and, in
        ZeRO 0 bf16, DeepSpeed's per-parameter overflow check. overlap_comm would need a new engine."""
        self.engine.tput_timer.config.enabled = True
        checker = getattr(self.engine.optimizer, "overflow_checker", None)
        if checker is not None:
            vars(checker).pop("has_overflow", None)  # batch_overflow_check's override: back to the class's


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
