"""Peak GPU memory of code run on fake tensors: every storage through the caching-allocator model, by category.

`MemoryTracker` is a dispatch mode above `FakeTensorMode`. Each new storage an op creates becomes an allocator
block (`CachingAllocatorModel`) that is freed when the storage dies; the tracker keeps the allocator's running
and peak totals, split into categories (a storage starts as "transient"; the caller names parameters, buffers,
inputs and optimiser state; tensors autograd saves for the backward become "activations", accumulated
gradients "gradients") and, within them, by label (the module scope that allocated it and the op). It also
counts the FLOPs of the matrix products and attention, with torch.utils.flop_counter's formulas.

What a CPU fake run cannot see, and how it is modelled here (GpuKernels), for a run on an sm_90 GPU:
- memory the CUDA kernels allocate internally through the caching allocator: the cuBLAS workspace (one per
  handle and stream, 32 MiB on sm_90; the autograd engine runs the backward on its own device thread, hence
  a second one at the first backward GEMM) and FlashAttention-2's backward scratch (dq_accum
  [B, round128(N), H, round32(D)] and softmax_d [B, H, round128(N)], fp32, alive during the call);
- kernels that save different tensors on the two devices: SDPA runs the CPU flash kernel, which keeps the
  output and the log-sum-exp as CUDA's FlashAttention does (both formulas save q, k, v, out, lse); its output
  is given CUDA's layout ([B, N, H, D] in memory, returned as a [B, H, N, D] view), so that the usual
  `out.transpose(1, 2).reshape(B, N, C)` is a view there, as on the GPU, not a copy;
- fused ops registered in `real_impls` run their real implementation on the fake tensors (their Triton launches
  skipped), so their chunk buffers are allocated as on the GPU, not only their outputs.
Not modelled (each small against a 5 % bound at the sizes calibrated): cuDNN convolution workspaces, a
separate cuBLASLt workspace, allocations on other streams (NCCL, DeepSpeed's overlapped reduction) and
fragmentation-driven `cudaMalloc` retries; `max_memory_allocated` does not count fragmentation itself.

Host synchronisation (`.item()`, `int(t)`, `bool(t)`: aten._local_scalar_dense) is recorded in `host_syncs`
and either raises `HostSyncError` or, with `host_values="placeholder"`, returns the value when FakeTensorMode
knows it (a constant such as AdamW's step count) and else a zero of the right type, so that code not under test
(the official implementation) can run on.
"""
from __future__ import annotations

import contextlib
import traceback
import weakref
from collections import Counter

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moca_fast.fakegpu.allocator import CachingAllocatorModel

MIB = 1 << 20
CATEGORIES = ("parameters", "buffers", "gradients", "optimizer", "inputs", "workspace", "activations", "transient")
_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.addmv.default,
          _aten.mv.default, _aten.addbmm.default}
if hasattr(_aten.mm, "dtype"):
    _GEMMS.add(_aten.mm.dtype)
_NOISE = {torch.ops.prim.device.default}


class HostSyncError(RuntimeError):
    """A device value was read on the host."""


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def cpu_attention_flop_formulas() -> dict:
    """The CPU flash-attention ops, which torch.utils.flop_counter's registry lacks, with the CUDA ops' formulas
    (forward 4·N²·d per head, backward 2.5x: it recomputes the scores); shape formulas, as FlopCounterMode's
    custom_mapping takes them."""
    return {getattr(_aten, name): formula for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flops)) if hasattr(_aten, name)}


def flop_formulas() -> dict:
    """torch.utils.flop_counter's formulas plus `cpu_attention_flop_formulas`, called on the op's arguments."""
    formulas = dict(flop_counter.flop_registry)
    formulas.update({op: flop_counter.shape_wrapper(f) for op, f in cpu_attention_flop_formulas().items()})
    return formulas


class GpuKernels:
    """The CUDA (sm_90) kernels' own allocations: cuBLAS workspace, FlashAttention-2 backward scratch."""

    CUBLAS_WORKSPACE = 32 * MIB  # torch's default on sm_90 (":4096:8"); 4096 KiB * 2 + 16 KiB * 8 elsewhere

    def __init__(self):
        self.workspaces: set[str] = set()

    def workspace_for(self, func) -> str | None:
        """The thread whose cuBLAS workspace `func` first needs ("forward" or "backward"), or None."""
        if func not in _GEMMS:
            return None
        thread = "backward" if torch._C._current_autograd_node() is not None else "forward"
        if thread in self.workspaces:
            return None
        self.workspaces.add(thread)
        return thread

    @staticmethod
    def gpu_layout(func, out):
        """`out` with the CUDA kernel's memory layout where it differs from the CPU kernel's."""
        if func is _aten._scaled_dot_product_flash_attention_for_cpu.default:
            attention, lse = out
            B, H, N, D = attention.shape
            return attention.new_empty(B, N, H, D).transpose(1, 2), lse
        return out

    @staticmethod
    def scratch(func, args) -> list[int]:
        """Bytes the CUDA kernel standing for `func` allocates internally for the duration of the call."""
        if func is _aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            B, H, N, D = args[1].shape
            return [B * _round_up(N, 128) * H * _round_up(D, 32) * 4, B * H * _round_up(N, 128) * 4]
        return []


class MemoryTracker(TorchDispatchMode):
    def __init__(self, gpu: GpuKernels | None = None, host_values: str = "raise", real_impls: dict | None = None):
        super().__init__()
        if host_values not in ("raise", "placeholder"):
            raise ValueError(f"host_values={host_values!r}")
        self.allocator = CachingAllocatorModel()
        self.gpu = gpu or GpuKernels()
        self.host_values = host_values
        self.real_impls: dict = dict(real_impls or {})
        self.blocks: dict[int, list] = {}  # storage key -> [block, category, label]
        self.current = Counter()  # (category, label) -> bytes
        self.peak_labels: dict = {}
        self.host_syncs: list[str] = []
        self.flops = 0
        self.scope = "-"
        self.workspace_blocks: list = []  # never freed, as torch keeps its cuBLAS workspaces
        self._formulas = flop_formulas()
        self._state = "track"  # or "paused" (nothing accounted), "fused" (new storages cost nothing)

    # ------------------------------------------------------------------ accounting
    @property
    def peak(self) -> int:
        return self.allocator.peak_allocated

    def _allocate(self, nbytes: int, category: str, label: str):
        block = self.allocator.malloc(nbytes)
        if block is not None:
            self.current[category, label] += block.size
            if self.allocator.allocated >= self.allocator.peak_allocated:
                self.peak_labels = {k: v for k, v in self.current.items() if v}
        return block

    def _free(self, block, category: str, label: str) -> None:
        if block is not None:
            self.current[category, label] -= block.size
            self.allocator.free(block)

    def _release(self, key: int) -> None:
        entry = self.blocks.pop(key, None)
        if entry is not None:
            self._free(*entry)

    def track(self, tensor: torch.Tensor, category: str = "transient", label: str | None = None) -> None:
        """Accounts for `tensor`'s storage (allocating it if new) under `category`."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown memory category {category!r}")
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self.blocks.get(key)
        if entry is None:
            size = 0 if self._state == "fused" else storage.nbytes()
            label = label or self.scope
            self.blocks[key] = [self._allocate(size, category, label), category, label]
            weakref.finalize(storage, self._release, key)
        elif entry[1] != category:
            block, old, label = entry
            if block is not None:
                self.current[old, label] -= block.size
                self.current[category, label] += block.size
            entry[1] = category

    def recategorize(self, tensor: torch.Tensor, category: str, only_from: tuple[str, ...] = ("transient",)) -> None:
        """Moves an already tracked storage to `category` when it is in one of `only_from`."""
        entry = self.blocks.get(tensor.untyped_storage()._cdata)
        if entry is not None and entry[1] in only_from:
            self.track(tensor, category)

    def reset_peak(self) -> None:
        self.allocator.reset_peak()
        self.peak_labels = {k: v for k, v in self.current.items() if v}

    def breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak (they sum to the peak)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for (category, _), size in self.peak_labels.items():
            out[category] += size
        return out

    def top_labels(self, category: str, n: int = 8) -> list[tuple[str, int]]:
        """The largest labels (scope/op) of a category at the peak, bytes."""
        items = [(label, size) for (c, label), size in self.peak_labels.items() if c == category]
        return sorted(items, key=lambda kv: -kv[1])[:n]

    # ------------------------------------------------------------------ contexts
    @contextlib.contextmanager
    def _set_for_block(self, attribute: str, value):
        previous = getattr(self, attribute)
        setattr(self, attribute, value)
        try:
            yield
        finally:
            setattr(self, attribute, previous)

    def paused(self):
        """Ops run untracked and uncounted (tracing a graph, not running it)."""
        return self._set_for_block("_state", "paused")

    def fused(self):
        """New storages cost nothing: values a fused GPU kernel keeps in registers (moca_fast.fakegpu.compiled)."""
        return self._set_for_block("_state", "fused")

    def scoped(self, name: str):
        """Allocations within are labelled `name` (e.g. a module's name)."""
        return self._set_for_block("scope", name)

    def label_modules(self, model: torch.nn.Module, depth: int = 2) -> list:
        """Labels allocations with the name of the innermost module (up to `depth` name components) that runs
        them. Returns the hook handles."""
        handles, stack = [], []
        for name, module in model.named_modules():
            if not name or name.count(".") >= depth:
                continue

            def enter(mod, args, name=name):
                stack.append(self.scope)
                self.scope = name

            def leave(mod, args, output):
                self.scope = stack.pop()

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        return handles

    @contextlib.contextmanager
    def saved_as_activations(self):
        """Tensors autograd saves for the backward within this block count as activations."""
        def pack(t):
            self.recategorize(t, "activations")
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def track_gradients(self, params) -> list:
        """Accumulated gradients of `params` count as gradients (hook handles returned)."""
        def hook(p):
            if p.grad is not None:
                self.recategorize(p.grad, "gradients", ("transient", "activations"))

        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NOISE or self._state == "paused":
            return func(*args, **kwargs)
        if func is _aten._local_scalar_dense.default:
            return self._host_value(args[0])
        impl = self.real_impls.get(func)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        label = f"{self.scope}/{func.__name__.split('.')[0]}"
        if self.gpu.workspace_for(func) is not None:
            self.workspace_blocks.append(self._allocate(GpuKernels.CUBLAS_WORKSPACE, "workspace", "cuBLAS"))
        scratch = [self._allocate(n, "transient", f"{label} (CUDA scratch)") for n in self.gpu.scratch(func, args)]
        out = self.gpu.gpu_layout(func, func(*args, **kwargs))
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.blocks:
                self.track(t, label=label)
        for block in scratch:
            self._free(block, "transient", f"{label} (CUDA scratch)")
        return out

    def _host_value(self, t: torch.Tensor):
        where = "".join(traceback.format_list(traceback.extract_stack(limit=12)[-8:-2]))
        self.host_syncs.append(where)
        if self.host_values == "raise":
            raise HostSyncError(f"a {t.dtype} {t.device.type} tensor was read on the host (.item(), int(), "
                                f"bool() or a Python branch on it) at\n{where}")
        constant = getattr(t, "constant", None)  # a value FakeTensorMode knows (a step counter, a scalar)
        if constant is not None:
            return constant.item()
        if t.dtype == torch.bool:
            return False
        return 0.0 if t.is_floating_point() else 0
