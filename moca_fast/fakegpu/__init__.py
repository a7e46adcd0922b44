"""GPU training code run without a GPU, on fake tensors (torch's FakeTensorMode: shapes, dtypes and devices, no
data, no memory, no compute).

- `fake_cuda()`: fake tensors on device "cuda" with CUDA autocast available. The forward dispatches as on a GPU
  (CUDA autocast rules, the fused ops' custom-op dispatch, devices), so a test can trace it. Without a GPU the
  autograd engine cannot run a backward on CUDA tensors ("hasPrimaryContext expects a valid device index"), and
  SDPA's backend choice falls back to its math path there.
- `fake_gpu()`: fake CPU tensors standing for CUDA ones, for a whole training step (forward, backward,
  optimiser): CUDA's autocast policy on CPU tensors (`autocast.py`), the fused kernels' GPU chunking with their
  launches skipped (`moca_fast.kernels.emulating_gpu`), and a `MemoryTracker` (`tracker.py`) that replays every
  allocation through a model of the CUDA caching allocator (`allocator.py`), with the CUDA kernels' own
  workspaces. Its docstring lists what remains different from a real run.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moca_fast.fakegpu.allocator import CachingAllocatorModel, round_size
from moca_fast.fakegpu.autocast import cuda_autocast_policy, unlisted_cuda_ops
from moca_fast.fakegpu.tracker import CATEGORIES, GpuKernels, HostSyncError, MemoryTracker

__all__ = ["CATEGORIES", "CachingAllocatorModel", "GpuKernels", "HostSyncError", "MemoryTracker", "convert_module",
           "cuda_autocast", "cuda_autocast_policy", "fake_cuda", "fake_gpu", "fused_op_impls", "round_size",
           "unlisted_cuda_ops"]


@contextlib.contextmanager
def cuda_autocast():
    """torch.autocast("cuda") stays on without a GPU: torch otherwise disables it with a warning (no CUDA
    device), and refuses bf16 when it cannot query the device's support."""
    import torch.cuda.amp.common as amp_common

    saved = amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    amp_common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True
    try:
        yield
    finally:
        amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported = saved


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors; create them with device="cuda" (see the module docstring). Yields the FakeTensorMode."""
    with cuda_autocast(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def convert_module(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None,
                   keep_dtype: tuple[str, ...] = ()) -> torch.nn.Module:
    """module.to(device, dtype) for fake tensors (Module.to cannot swap fake parameters, and a tensor made from
    numpy under FakeTensorMode stays a real CPU tensor): replaces every parameter and buffer by a moved copy,
    cast when floating unless it belongs to a submodule named in `keep_dtype`. Call it before anything holds
    the parameters (an optimiser)."""
    keep = {id(t) for name in keep_dtype for t in module.get_submodule(name).state_dict(keep_vars=True).values()}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                cast = dtype if dtype is not None and t.is_floating_point() and id(t) not in keep else t.dtype
                moved = t.detach().to(device=device or t.device, dtype=cast)
                table[name] = torch.nn.Parameter(moved, t.requires_grad) if table is sub._parameters else moved
    return module


def fused_op_impls() -> dict:
    """moca_fast's fused custom ops -> their real implementations, which MemoryTracker runs on the fake tensors
    (launches skipped) so that their internal buffers are allocated as on the GPU."""
    from moca_fast.kernels import codebook_assign, soft_ce

    return {op._opoverload: op._init_fn for op in (soft_ce._kl_fwd_op, codebook_assign._codebook_assign_op)}


@contextlib.contextmanager
def fake_gpu(host_values: str = "raise", gpu: GpuKernels | None = None):
    """Fake CPU tensors standing for CUDA ones, with memory accounting (see the module docstring).

    Yields the MemoryTracker; autocast inside is written torch.autocast("cpu", dtype) and casts as CUDA's does.
    """
    from moca_fast import kernels

    with cuda_autocast_policy(), kernels.emulating_gpu(), FakeTensorMode(allow_non_fake_inputs=True), \
            MemoryTracker(gpu, host_values, fused_op_impls()) as tracker:
        yield tracker
