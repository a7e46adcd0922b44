"""What a forward does on the GPU, traced on fake CUDA tensors (moca_fast.fakegpu.fake_cuda): host
synchronisations, tensors that leave the device, and the calls of moca_fast's fused ops with their dtypes.

`StepTrace` is a dispatch mode. It raises `HostSyncError` at the first host read of a device value
(`.item()`, `int()`, `float()`, `bool()` and so a Python `if` on a tensor, `.tolist()`), and records every op
that takes or makes a CPU tensor (`.cpu()`, a tensor created without device=...) and every fused-op call.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moca_fast.fakegpu.tracker import HostSyncError

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
               torch.ops.aten.item.default}
_NOISE = {torch.ops.prim.device.default}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
    return "".join(traceback.format_list(frames[-4:]))


@dataclass
class FusedCall:
    op: str
    inputs: dict[str, object]  # argument name -> dtype (tensors) or value (dtype arguments)
    outputs: tuple


@dataclass
class StepTrace(TorchDispatchMode):
    device: str = "cuda"
    fused_namespace: str = "moca_fast"
    fused_calls: list[FusedCall] = field(default_factory=list)
    off_device: list[str] = field(default_factory=list)  # "op: where" for ops touching other devices

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NOISE:
            return func(*args, **kwargs)
        if func in _HOST_READS:
            raise HostSyncError(f"{func.name()}: a device value read on the host (.item(), int(), bool(), a Python "
                                f"branch on a tensor) at\n{_where()}")
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type != self.device for t in tensors):
            self.off_device.append(f"{func.name()} on {sorted({str(t.device) for t in tensors})} at\n{_where()}")
        if func.namespace == self.fused_namespace:
            names = [a.name for a in func._schema.arguments]
            values = dict(zip(names, args)) | kwargs
            self.fused_calls.append(FusedCall(func.name(), {
                k: (v.dtype if isinstance(v, torch.Tensor) else v) for k, v in values.items()
                if isinstance(v, (torch.Tensor, torch.dtype))},
                tuple(t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor))))
        return out
