"""The trainer's step on fake tensors standing for one GPU of a run (moca_fast.fakegpu.fake_gpu).

`run_steps` builds MOCA as `moca_fast.train.engine.build_engine` prepares it for a GPU run (fast-path pieces
of `trainer_fast_options` for a CUDA device, DeepSpeed's bf16 cast with the teacher and codebook put back in
fp32), then runs `moca_fast.train.step.train_step` itself, as the training loop does, on `DeepSpeedStandIn`:
an object with the engine's interface that allocates what DeepSpeed 0.19's engine allocates for this
config (read from its source, runtime/zero/stage_1_and_2.py and runtime/fp16/unfused_optimizer.py):
- ZeRO 0 (bf16: FP16_UnfusedOptimizer): the bf16 parameters, an fp32 master copy of each, AdamW's two fp32
  moments; gradients accumulate in bf16 in param.grad; with several ranks the all-reduce flattens them
  (a bf16 copy of all of them); the step converts each to fp32 (kept until the update is done).
- ZeRO 1 and 2 (DeepSpeedZeroOptimizer, contiguous_gradients, overlap_comm as configured): each parameter group
  flattened into one bf16 buffer (the parameters become views of it), this rank's fp32 partition of it
  (1/world) and AdamW's moments of that partition; from the first gradient of the backward, the
  reduction buckets (`reduce_bucket_size` elements, bf16; two with overlap_comm) into which each gradient
  is copied as it is accumulated (the gradient itself is freed); the partition's gradients (1/world, bf16)
  from the first reduction (the end of the backward when everything fits one bucket), the buckets freed
  after the backward; at the step the partition's flat gradient in bf16, then fp32.
With gradient accumulation, the accumulated gradients (ZeRO 0: param.grad; ZeRO 1 and 2: the partition's
buffer) live through the later micro-steps. Not modelled: the NCCL buffers and DeepSpeed's side streams;
ZeRO 1's own accumulation (modelled as ZeRO 2's).
"""
from __future__ import annotations

import math

import torch

from moca_fast.config import Config
from moca_fast.fakegpu import MemoryTracker, convert_module
from moca_fast.fakegpu.compiled import compile_like_inductor
from moca_fast.model.fastpath import FastOptions, prepare_fast, trainer_fast_options
from moca_fast.model.moca import MOCA
from moca_fast.train.engine import FP32_SUBMODULES, generate_deepspeed_config
from moca_fast.train.schedules import parameter_groups
from moca_fast.train.step import LossTotals, train_step

#: DeepSpeed's default zero_optimization.reduce_bucket_size (elements), when the config does not set one
DEEPSPEED_REDUCE_BUCKET_SIZE = 500_000_000
GPU = torch.device("cuda")


def prepare_model(cfg: Config, world_size: int, precision: str, memory: MemoryTracker) -> MOCA:
    """MOCA as the trainer runs it on a GPU, its tensors tracked; torch.compile of the blocks, when the fast-path
    options ask for it, by its fake-tensor stand-in (moca_fast.fakegpu.compiled)."""
    model = MOCA(cfg, world_size)
    options = trainer_fast_options(cfg, GPU)
    if options is not None:
        prepare_fast(model, FastOptions(**{**options.__dict__, "compile_blocks": False}))
        if options.compile_blocks:
            students = [model.encoder] + ([model.decoder] if model.use_dense_loss else [])
            blocks = [block for module in students + [model.teacher] for block in module.blocks]
            compile_like_inductor(blocks, memory, options.activation_memory_budget)
    if precision == "bf16":  # DeepSpeed's bf16 mode casts the module; build_engine puts these back in fp32
        convert_module(model, dtype=torch.bfloat16, keep_dtype=FP32_SUBMODULES)
    for p in model.parameters():
        memory.track(p, "parameters")
    for b in model.buffers():
        memory.track(b, "buffers")
    return model.train()


class DeepSpeedStandIn:
    """The engine's interface for train_step, with DeepSpeed's allocations (module docstring)."""

    def __init__(self, model: MOCA, cfg: Config, world_size: int, precision: str, memory: MemoryTracker):
        self.module, self.memory, self.world = model, memory, world_size
        ds = generate_deepspeed_config(cfg, world_size, precision)["zero_optimization"]
        self.stage = ds["stage"]
        self.overlap = ds.get("overlap_comm", False)
        self.bucket_size = int(ds.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET_SIZE))
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.groups = [g["params"] for g in parameter_groups(model, model.GENERATOR_PREFIXES)]
        self.params = [p for g in self.groups for p in g]
        if self.stage == 0:
            self.masters = [[p.detach().clone().float() for p in g] for g in self.groups] if precision == "bf16" \
                else self.groups
            memory.track_gradients(self.params)
        else:
            self.flat = [self._flatten(g) for g in self.groups]
            self.masters = [[f[:self._partition(f.numel())].to(torch.float32, copy=True)] for f in self.flat]
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._bucket_gradient)
        for g in self.masters:
            for t in g:
                if all(t is not p for p in self.params):  # a master copy (fp32 ZeRO 0 steps the parameters)
                    memory.track(t, "optimizer")
                t.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([{"params": g} for g in self.masters], lr=0.0, fused=True)
        self._initialize_optimizer_state()
        self.buckets: list[torch.Tensor] = []
        self.bucket_used = 0
        self.partition_grads: torch.Tensor | None = None
        self.accumulation, self.micro_steps = cfg.grad_accum, 0

    def _initialize_optimizer_state(self) -> None:
        """AdamW's moments exist from the first step on: created now, so that one step shows the steady state."""
        for g in self.masters:
            for m in g:
                m.grad = torch.zeros_like(m)
        self.optimizer.step()
        for g in self.masters:
            for m in g:
                m.grad = None
        for state in self.optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    self.memory.recategorize(t, "optimizer")

    # ------------------------------------------------------------------ layout
    def _partition(self, numel: int) -> int:
        return math.ceil(numel / self.world)

    def _flatten(self, params) -> torch.Tensor:
        """One flat buffer per group (padded to a multiple of the world size); the parameters become views."""
        flat = torch.empty(self._partition(sum(p.numel() for p in params)) * self.world, dtype=self.dtype)
        self.memory.track(flat, "parameters")
        offset = 0
        for p in params:
            p.data = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return flat

    # ------------------------------------------------------------------ engine interface
    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation == 0

    def __call__(self, *args, **kwargs):
        with self.memory.saved_as_activations():
            return self.module(*args, **kwargs)

    def _bucket_gradient(self, param: torch.Tensor) -> None:
        """ZeRO 1/2: the gradient copied into the reduction bucket (allocated at the first one), then freed."""
        if not self.buckets:
            self.buckets = [torch.empty(self.bucket_size, dtype=self.dtype) for _ in range(2 if self.overlap else 1)]
            for b in self.buckets:
                self.memory.track(b, "gradients")
        n = param.numel()
        if n <= self.bucket_size:
            if self.bucket_used + n > self.bucket_size:
                self._reduce_bucket()
            view = self.buckets[0][self.bucket_used:self.bucket_used + n]
            view.copy_(param.grad.reshape(-1))
            self.bucket_used += n
        param.grad = None

    def _reduce_bucket(self) -> None:
        """A full bucket is reduced: this rank's share lands in the partition's gradient buffer."""
        if self.partition_grads is None:
            size = sum(self._partition(f.numel()) for f in self.flat)
            self.partition_grads = torch.empty(size, dtype=self.dtype)
            self.memory.track(self.partition_grads, "gradients")
        self.buckets.reverse()
        self.bucket_used = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.stage == 0:
            if self.world > 1 and self.is_gradient_accumulation_boundary():  # the all-reduce: one flat copy
                torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None])
        else:
            self._reduce_bucket()
            self.buckets = []

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.stage == 0:
            for masters, params in zip(self.masters, self.groups):
                for m, p in zip(masters, params):
                    m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
        else:
            offset = 0
            for [master], flat in zip(self.masters, self.flat):
                n = master.numel()
                flat_grad = self.partition_grads[offset:offset + n].clone()  # flatten(averaged_gradients)
                master.grad = flat_grad.float()
                del flat_grad
                offset += n
            self.partition_grads = None
        self.optimizer.step()
        for g in self.masters:
            for m in g:
                m.grad = None
        if self.stage == 0:
            for p in self.params:
                p.grad = None


def run_steps(cfg: Config, world_size: int, precision: str, memory: MemoryTracker, steps: int = 2) -> MOCA:
    """`steps` optimiser steps (cfg.grad_accum micro-batches of cfg.batch_size each) on one GPU of `world_size`,
    from model construction on; memory.flops holds the last step's. The second step's peak is the steady state: the first lacks the
    allocator's cache of a previous step (0.1 % lower at ViT-B/16 batch 256), the third equals the second."""
    model = prepare_model(cfg, world_size, precision, memory)
    memory.label_modules(model, depth=1)
    engine = DeepSpeedStandIn(model, cfg, world_size, precision, memory)
    totals = LossTotals(torch.device("cpu"))  # fake CPU tensors stand for the GPU's
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def micro_batches():  # made one at a time, as a loader yields them
        for _ in range(cfg.grad_accum):
            views = [torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size) for _ in range(2)]
            for x in views:
                memory.track(x, "inputs")
            yield views

    for _ in range(steps):
        memory.flops = 0
        train_step(engine, micro_batches(), 0.996, dtype, totals)
        for p in model.parameters():
            memory.recategorize(p, "parameters", ("transient", "activations"))
    return model
