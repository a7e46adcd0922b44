"""Fast-path model preparation and the mixed-precision optimiser that goes with it.

`prepare_fast(model, options)` changes how a MOCA model runs, never what it computes:
- the patch embedding as one GEMM over unfolded patches (same `patch_embed.proj` parameters);
- bf16 student encoder and decoder weights, with fp32 masters kept by `MixedPrecisionAdamW`: no
  per-call weight casts, and the residual stream stays bf16 (with fp32 weights under autocast it
  is fp32). The teacher keeps fp32 weights (its EMA accumulates in fp32, DESIGN §1) and runs
  under autocast; the generators (K rows, run under autocast) and the codebook stay fp32.
  The trainer differs there: DeepSpeed's bf16 mode casts every parameter of its module, the
  generators' included (their fp32 masters live in its optimiser), and the engine puts back only
  the teacher and the codebook (moca_fast.train.engine; tests/test_engine.py checks both). Casting
  the generators here too was tried: on the tiny model the BatchNorm bias gradient then moves by
  6.3e-2 relative from the reference, past test_fast_prepared_model_matches_reference's 5e-2 bar, so
  here they stay fp32;
- torch.compile of each transformer block (regional compilation: the blocks share one code object,
  so one compilation per distinct input shape serves all of them), which fuses bias + GELU,
  residual + LayerNorm and the dtype casts. An activation memory budget below 1 lets the
  forward/backward partitioner recompute cheap ops in the backward instead of saving their outputs:
  for a ViT-B block in bf16 at 0.8 (the default) it keeps 11 instead of 17 values per token and channel
  (it recomputes the LayerNorm and GELU outputs, not a matmul or the attention; found on the CPU by
  inspecting the partitioned graph, the same for ViT-L and the decoder's blocks; below 0.7 it recomputes
  the attention forward). At ViT-B/16 batch 256 that is the difference between a predicted 27 GiB and
  18.4 GiB peak (bench/estimate.py, BENCHMARKS.md); 1.0 keeps torch's default partition.
The benches' standalone fast step (bench/steps.py) runs the forward under bf16 autocast: the fused
loss kernels take their product dtype from it (moca_fast.kernels.matmul_dtype), and the reference
losses' fp32 matmuls become bf16 ones, as in the official code. The trainer applies the same
preparation minus the bf16 weights, which DeepSpeed's bf16 mode owns (`trainer_fast_options`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

#: torch.compile recompilations allowed per code object. Every block of every encoder and decoder
#: shares Block.forward, compiled once per input shape (and grad mode, dtype): two masking rounds, two
#: decoder lengths and the teacher make 5 (the k-NN evaluation runs the teacher at its training shape,
#: see moca_fast.probes.knn.extract_features); other callers' shapes (benchmarks, evaluations at other batch
#: sizes) would soon reach dynamo's default limit of 8, past which it silently runs new shapes eagerly.
RECOMPILE_LIMIT = 64


@dataclass
class FastOptions:
    bf16_weights: bool = True
    matmul_patch_embed: bool = True
    compile_blocks: bool = True
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" traces without generating code (tests)
    activation_memory_budget: float = 0.8  # torch._functorch's, for the compiled blocks; 1.0: torch's default


class MatmulPatchEmbed(nn.Module):
    """Patch embedding as unfold + GEMM, sharing the Conv2d's parameters (and state-dict names).

    A stride = kernel convolution over 3 input channels does not map well onto tensor cores; the
    same product written as [B*L, 3*p*p] x [3*p*p, C] does.
    """

    def __init__(self, proj: nn.Conv2d):
        super().__init__()
        self.proj = proj
        self.patch_size = proj.kernel_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> [B, L, C]."""
        B, Cin, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, Cin, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B, (H // p) * (W // p), Cin * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def prepare_fast(model: nn.Module, options: FastOptions | None = None) -> nn.Module:
    """Applies the fast-path changes to a MOCA model in place and returns it (see module docstring)."""
    options = options or FastOptions()
    encoders = [model.encoder, model.teacher]
    if options.matmul_patch_embed:
        for enc in encoders:
            if not isinstance(enc.patch_embed, MatmulPatchEmbed):
                enc.patch_embed = MatmulPatchEmbed(enc.patch_embed.proj)
    student = [model.encoder] + ([model.decoder] if model.use_dense_loss else [])
    if options.bf16_weights:
        for module in student:
            module.to(torch.bfloat16)
    if options.compile_blocks:
        raise_recompile_limit(RECOMPILE_LIMIT)
        for module in student + [model.teacher]:
            for block in module.blocks:
                block.compile(backend=compile_backend(options.compile_backend, options.activation_memory_budget),
                              dynamic=False)
    model.fast_options = options
    return model


def blocks_compiled(model: nn.Module) -> bool:
    """Whether `prepare_fast` compiled the model's transformer blocks: each new input shape then compiles."""
    options = getattr(model, "fast_options", None)
    return options is not None and options.compile_blocks


@functools.lru_cache(maxsize=None)
def compile_backend(name: str, activation_memory_budget: float):
    """torch.compile backend `name`, partitioning forward and backward under the activation memory budget.

    One object per (name, budget): dynamo reuses a compiled graph only under the same backend, and every
    block must share the graphs compiled for the first.
    """
    if activation_memory_budget >= 1.0:
        return name
    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.registry import lookup_backend

    compiler = lookup_backend(name)

    def backend(graph_module, example_inputs):
        with functorch_config.patch(activation_memory_budget=activation_memory_budget):
            return compiler(graph_module, example_inputs)

    return backend


def raise_recompile_limit(limit: int) -> None:
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def trainer_fast_options(cfg, device: torch.device) -> FastOptions | None:
    """The fast-path pieces the trainer applies for a Config, or None for none.

    impl="fast": the patch embedding as a GEMM. compile_blocks "on", or "auto" with impl="fast" on a
    CUDA device: compiled blocks, under cfg.activation_memory_budget. Never bf16 weights: under
    DeepSpeed's bf16 mode the engine casts the student and keeps the fp32 masters itself.
    """
    fast = cfg.impl == "fast"
    compile_on = cfg.compile_blocks == "on" or (cfg.compile_blocks == "auto" and fast and device.type == "cuda")
    if not fast and not compile_on:
        return None
    return FastOptions(bf16_weights=False, matmul_patch_embed=fast, compile_blocks=compile_on,
                       activation_memory_budget=cfg.activation_memory_budget)


class MixedPrecisionAdamW:
    """AdamW with global grad-norm clipping, stepping fp32 master copies of low-precision parameters.

    Parameters that are already fp32 are their own masters. One step: low-precision grads -> fp32
    master grads, clip the global norm (fp32), AdamW, masters -> parameters (rounded).
    param_groups: torch.optim-style groups over the model's parameters.
    """

    def __init__(self, param_groups: list[dict], clip_grad: float | None, fused: bool = False, **adamw_kwargs):
        self.clip_grad = clip_grad
        self.params, self.masters = [], []
        master_groups = []
        for group in param_groups:
            masters = []
            for p in group["params"]:
                m = p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                self.params.append(p)
                self.masters.append(m)
                masters.append(m)
            master_groups.append({**group, "params": masters})
        self.low_precision = [(p, m) for p, m in zip(self.params, self.masters) if p is not m]
        kwargs = dict(adamw_kwargs, fused=True) if fused else adamw_kwargs
        self.optimizer = torch.optim.AdamW(master_groups, **kwargs)

    @torch.no_grad()
    def step(self) -> torch.Tensor | None:
        """Returns the total grad norm before clipping (a tensor: no host sync), or None without clipping."""
        for p, m in self.low_precision:
            m.grad = None if p.grad is None else p.grad.float()
        norm = None
        if self.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_([m for m in self.masters if m.grad is not None], self.clip_grad)
        self.optimizer.step()
        if self.low_precision:
            torch._foreach_copy_([p for p, _ in self.low_precision], [m for _, m in self.low_precision])
        return norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for _, m in self.low_precision:
            m.grad = None
