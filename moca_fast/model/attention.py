"""One attention function, several backends; the choice is made once per process and logged.

Backends: xformers memory_efficient_attention, used only when its CUDA ops really run here, and
PyTorch scaled_dot_product_attention (always available; the default on CPU). An import is not
enough: the PyPI xformers wheel is built against one torch release and its ops fail to load under
any other, so the start-up probe runs a tiny forward + backward and compares it with SDPA.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers")

# "ok" or "unavailable: <reason>"; set by the first xformers_status() call of the process.
_xformers_status: str | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: [B, H, N, D] -> [B, H, N, D] through xformers, whose layout is [B, N, H, D]."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def probe_xformers(device: str = "cuda") -> str | None:
    """Runs a tiny xformers attention forward + backward on `device` and checks it against SDPA.

    Returns None when it works, else a one-line reason.
    """
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"import failed: {_first_line(e)}"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(2, 2, 16, 64, device=device, dtype=dtype, generator=gen) for _ in range(3))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _xformers_attention(*leaves)
        out.float().square().sum().backward()
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_leaves)
        ref.float().square().sum().backward()
    except Exception as e:  # ops built for another torch / CUDA, or no kernel for this GPU
        return f"call failed: {_first_line(e)}"
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
    for got, want in pairs:
        if got is None or got.shape != want.shape:
            return "probe gave no gradient or a wrong shape"
        err = (got.float() - want.float()).abs().max().item()
        if not err <= tol * max(1.0, want.float().abs().max().item()):
            return f"probe disagrees with SDPA (max abs error {err:.3g})"
    return None


def xformers_status(device: str = "cuda") -> str:
    """'ok' when xformers attention runs here, else 'unavailable: <reason>' (probed once, logged)."""
    global _xformers_status
    if _xformers_status is None:
        reason = probe_xformers(device)
        _xformers_status = "ok" if reason is None else f"unavailable: {reason}"
        log.info("xformers attention: %s", _xformers_status)
    return _xformers_status


def resolve_backend(requested: str = "auto", device: str = "cuda") -> str:
    """Maps a config value (auto|sdpa|xformers) to the backend that will run, and logs the choice."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"attention={requested!r} must be 'auto', 'sdpa' or 'xformers'")
    if requested == "sdpa":
        backend = "sdpa"
    elif xformers_status(device) == "ok":
        backend = "xformers"
    else:
        if requested == "xformers":
            log.warning("attention=xformers requested but xformers does not run here (%s); using sdpa",
                        _xformers_status)
        backend = "sdpa"
    log.info("attention backend: %s (requested %s)", backend, requested)
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention with the default 1/sqrt(head_dim) scale.

    q, k, v: [B, H, N, D] -> [B, H, N, D]. The xformers backend applies to CUDA tensors only (its
    probe ran on the GPU); anything else takes SDPA.
    """
    if backend == "xformers" and q.is_cuda:
        return _xformers_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
