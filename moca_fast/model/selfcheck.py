"""Start-up self-check of the fused ops, before a fast-path run's first step.

`check_fused_ops(cfg, device, dtype)` runs each fused op (teacher assignment, image loss, the dense loss of each
masking round) forward and backward twice: once at the run's own shapes (batch_size images per view), which
compiles and autotunes every kernel specialisation the run will launch (they depend on K, C, D, the dtypes and
the strides, not on the batch), and once at 2 images per view (at most batch_size) against its PyTorch
reference on the same random inputs (the reference in fp32 on the operands rounded to the product dtype),
forward and every gradient, at the project's tolerances (fp32 1e-5, bf16/fp16 1e-2 relative to each output's
largest entry).

A failure raises SelfCheckError (a ConfigError: the launcher prints its one line and exits 2), naming the op,
the output and the reason: the run stops; it never falls back to the reference silently. The trainer calls it
on CUDA with impl=fast; the tests call it on the CPU under Triton's interpreter.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from moca_fast.config import Config
from moca_fast.errors import ConfigError
from moca_fast.kernels import codebook_assign as ca
from moca_fast.kernels import soft_ce
from moca_fast.model.codebook import interior_token_ids
from moca_fast.model.masks import make_two_complementary_masks

log = logging.getLogger(__name__)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CHECK_IMAGES = 2


class SelfCheckError(ConfigError):
    """A fused op failed its start-up check; one line naming the op and the reason."""


def _inputs(cfg: Config, images: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Random loss-path inputs for `images` images per view, in the layout and dtypes the trainer passes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    L, C, K, D = cfg.num_patches, cfg.embed_dim, cfg.num_words, cfg.decoder_embed_dim

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    n = 2 * images
    masks = make_two_complementary_masks(n, L, cfg.len_keep(), cfg.len_dec(), torch.device("cpu"))
    bow = torch.softmax(rand(n, K), dim=1)
    return dict(tokens=rand(n, L + 1, C, dtype=dtype)[:, 1:], words=F.normalize(rand(K, C).clamp(min=0), dim=1),
                inv_temp=torch.tensor([cfg.inv_delta / 0.5], device=device),
                interior=interior_token_ids(cfg.grid_size, cfg.skip_offset, device), bow=bow,
                dec_ids=[m[:, :k].to(device) for m, k in zip(masks, cfg.len_dec())],
                avg=rand(n, C, dtype=dtype), img_protos=F.normalize(rand(K, C), dim=1).to(dtype),
                dense_protos=F.normalize(rand(K, D), dim=1).to(dtype))


def _cases(x: dict, kappa: float):
    """(op name, fused fn, reference fn, differentiable inputs): each fn maps the inputs to its outputs."""
    rounded_words = x["words"].to(x["tokens"].dtype).float()
    yield ("codebook_assign", [], lambda: ca.codebook_assign(x["tokens"], x["words"], x["inv_temp"], x["interior"]),
           lambda: ca.codebook_assign_reference(x["tokens"], rounded_words, x["inv_temp"], x["interior"]))
    yield ("soft_ce.soft_target_kl (image loss)", [x["avg"], x["img_protos"]],
           lambda f, p: (soft_ce.soft_target_kl(f, p, kappa, x["bow"]),),
           lambda f, p: (soft_ce.soft_target_kl_reference(f, p, kappa, x["bow"]),))
    for round_, ids in enumerate(x["dec_ids"], 1):
        dec = torch.randn(ids.numel(), x["dense_protos"].shape[1], device=ids.device).to(x["avg"].dtype)
        yield (f"soft_ce.masked_soft_target_kl (dense loss, round {round_})", [dec, x["dense_protos"]],
               lambda f, p, ids=ids: (soft_ce.masked_soft_target_kl(f, p, kappa, x["tokens"], ids, x["words"],
                                                                    x["inv_temp"]),),
               lambda f, p, ids=ids: (soft_ce.masked_soft_target_kl_reference(f, p, kappa, x["tokens"], ids,
                                                                              rounded_words, x["inv_temp"]),))


def _run(fn, leaves: list[torch.Tensor], fp32: bool) -> list[tuple[str, torch.Tensor]]:
    """fn's outputs and, when it has inputs, the gradients of its first output (leaves copied, fp32 if asked)."""
    leaves = [(t.detach().float() if fp32 else t.detach()).requires_grad_() for t in leaves]
    with torch.autocast(leaves[0].device.type if leaves else "cpu", enabled=False):
        out = fn(*leaves)
        grads = torch.autograd.grad(out[0], leaves) if leaves else []
    names = ["loss", "d_features", "d_prototypes"] if leaves else ["bow", "stat"]
    return list(zip(names, [*out, *grads]))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().abs().max().clamp_min(1e-30)
    return ((a.double() - b.double()).abs().max() / scale).item()


def check_fused_ops(cfg: Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Compiles every fused op at the run's shapes and checks it against its reference; SelfCheckError if not."""
    start = time.perf_counter()
    tol = TOL[dtype]
    run = _inputs(cfg, cfg.batch_size, device, dtype, seed)
    small = _inputs(cfg, min(CHECK_IMAGES, cfg.batch_size), device, dtype, seed + 1)
    for (name, leaves, fused, _), (_, small_leaves, small_fused, reference) in zip(
            _cases(run, float(cfg.kappa)), _cases(small, float(cfg.kappa))):
        where = f"impl=fast: start-up check of moca_fast.kernels.{name}"
        try:
            _run(fused, leaves, fp32=False)
            got = _run(small_fused, small_leaves, fp32=False)
        except Exception as e:  # any failure to compile or launch stops the run, in one line
            text = str(e).strip().splitlines()
            raise SelfCheckError(f"{where}: failed to compile or run: {type(e).__name__}: "
                                 f"{text[0] if text else ''}") from e
        for (output, a), (_, b) in zip(got, _run(reference, small_leaves, fp32=True)):
            if not torch.isfinite(a).all():
                raise SelfCheckError(f"{where}: {output} is not finite ({str(dtype)[6:]})")
            err = _rel_err(a, b)
            if err > tol:
                raise SelfCheckError(f"{where}: {output} differs from the reference by {err:.1e} relative "
                                     f"(> {tol:g}, {str(dtype)[6:]})")
    log.info("fast-path self-check: every fused op compiled at the run's shapes and matches its reference "
             "(%s, %.1f s)", str(dtype)[6:], time.perf_counter() - start)
