"""One attention function, several backends; the choice is made once and logged.

Backends: xformers memory_efficient_attention (only when its CUDA ops really run: probed with a tiny
call, since the PyPI wheel is built against one torch release) and PyTorch scaled_dot_product_attention
(always available, the default on CPU).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_xformers_ok: bool | None = None


def xformers_available() -> bool:
    """True when xformers' CUDA kernels run here (checked once with a tiny call)."""
    global _xformers_ok
    if _xformers_ok is None:
        _xformers_ok = False
        reason = "no CUDA device"
        if torch.cuda.is_available():
            try:
                import xformers.ops as xops

                q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
                xops.memory_efficient_attention(q, q, q)
                _xformers_ok = True
            except Exception as e:  # ImportError, or ops built for another torch/CUDA
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not _xformers_ok:
            log.info("xformers attention unavailable (%s); using PyTorch SDPA", reason)
    return _xformers_ok


def resolve_backend(requested: str = "auto") -> str:
    """Maps a config value (auto|sdpa|xformers) to the backend that will run."""
    if requested == "sdpa":
        return "sdpa"
    if xformers_available():
        return "xformers"
    if requested == "xformers":
        log.warning("attention=xformers requested but xformers does not run here; using sdpa")
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention with the default 1/sqrt(head_dim) scale.

    q, k, v: [B, H, N, D] -> [B, H, N, D].
    """
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
