"""Fused Triton kernels of the fast path, installed as moca_fast.kernels.

One module per op, each holding its Triton kernels, the torch.library custom op (autograd and fake
registrations, so torch.compile traces around it) and the plain PyTorch reference of the same function (built on
moca_fast.reference_ops; the kernels import nothing of the model):
- codebook_assign: teacher soft codebook assignment -> bag-of-words + dist_norm statistic;
- soft_ce: KL(target || softmax(kappa f P^T)), with dense targets or with teacher codes recomputed per chunk.
moca_fast.model.selfcheck compiles and checks every op at a run's shapes before training starts.

Where the kernels run: CUDA tensors; CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set
before triton is first imported, as the tests do). Elsewhere the ops compute their PyTorch reference
(logged once). TRITON_INTERPRET=1 set too late (the kernels already compiled for the GPU) is an error, never
a silent reference: kernel tests would otherwise compare the reference with itself. Every real launch goes
through `launch`, which counts it (`LAUNCHES`), so tests can tell that the Triton path ran. Inside
`emulating_gpu()` (memory estimates on fake CPU tensors, moca_fast.fakegpu) CPU tensors stand for CUDA ones: GPU
chunk sizes and launch parameters, and launches skipped (fake tensors hold no data).

Matmul precision (`matmul_dtype`): a bf16/fp16 input, or autocast to bf16/fp16 on the input's device (what
the reference's F.linear / matmul would then use), gives tensor-core products in that dtype with fp32
accumulation and fp32 results (`mm_f32`); otherwise products are exact fp32 (no TF32, no bf16 passes), whatever
the process-wide fp32 matmul precision says (`ieee_fp32_matmul`). Softmax, log-sum-exp and reductions are
always fp32.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter

import torch
import triton.language as tl
from triton.runtime import Autotuner, Heuristics, JITFunction, KernelInterface

log = logging.getLogger(__name__)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_fallback_logged: set[str] = set()
INTERPRET_HINT = "set TRITON_INTERPRET=1 before triton is first imported (torchvision imports it)"
#: Triton launches per kernel name in this process (interpreter and GPU alike).
LAUNCHES: Counter = Counter()
_recorder: list | None = None
_gpu_emulated = False


def _kernel_fn(kernel):
    """The jitted function under autotune / heuristics wrappers."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def interpreted(kernel) -> bool:
    """True when `kernel` and Triton's own library (tl.zeros, ...) were both decorated with Triton's interpreter
    on, i.e. TRITON_INTERPRET=1 was set before triton was first imported: the kernel then runs on CPU tensors.
    Read through public types: a Triton kernel that is not a JITFunction is an interpreted one."""
    def interp(fn):
        return isinstance(fn, KernelInterface) and not isinstance(fn, JITFunction)

    return interp(_kernel_fn(kernel)) and interp(tl.zeros)


def on_gpu(device: torch.device) -> bool:
    """GPU launch parameters for this device: CUDA, meta (the shapes-only launches the AOT compile check of
    bench/compile.py records), or CPU inside `emulating_gpu()`."""
    return device.type in ("cuda", "meta") or (_gpu_emulated and device.type == "cpu")


@contextlib.contextmanager
def emulating_gpu():
    """CPU tensors are treated as CUDA tensors and launches are skipped (see the module docstring)."""
    global _gpu_emulated
    previous, _gpu_emulated = _gpu_emulated, True
    try:
        yield
    finally:
        _gpu_emulated = previous


def runs_triton(kernel, device: torch.device, op: str) -> bool:
    """Whether `kernel` can run on `device`; logs once per op when the PyTorch reference stands in."""
    if device.type == "cuda" or (device.type == "cpu" and (interpreted(kernel) or _gpu_emulated)):
        return True
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(f"moca_fast.kernels.{op}: TRITON_INTERPRET is set but the kernels were compiled for "
                           f"the GPU: {INTERPRET_HINT}")
    if op not in _fallback_logged:
        _fallback_logged.add(op)
        log.warning("moca_fast.kernels.%s: no Triton on %s (to run the kernels on CPU, %s); using the PyTorch "
                    "reference", op, device.type, INTERPRET_HINT)
    return False


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), counted in LAUNCHES; inside `recording()`, recorded instead of run."""
    if _recorder is not None:
        _recorder.append((kernel, grid, args, kwargs))
        return
    if _gpu_emulated:
        return
    kernel[grid](*args, **kwargs)
    LAUNCHES[_kernel_fn(kernel).__name__] += 1


@contextlib.contextmanager
def recording():
    """Collects the launches the ops would make (kernel, grid, args, kwargs) without running them: with meta
    tensors, the exact launch parameters of any shape, on a machine without a GPU."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the products of x with fp32 weights: x's own 16-bit dtype, the autocast dtype, or fp32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return torch.float32


#: fp32 matmul precision settings below IEEE fp32 products (new API: torch.backends.*.matmul.fp32_precision)
_REDUCED_FP32_PRECISION = ("tf32", "bf16")


def _has_fp32_precision_api() -> bool:
    """torch >= 2.9: per-backend `fp32_precision` settings; before it, only the legacy `allow_tf32` flags."""
    try:
        torch.backends.cuda.matmul.fp32_precision
    except AttributeError:
        return False
    return True


_FP32_PRECISION_API = _has_fp32_precision_api()


def _fp32_matmul_setting(device_type: str):
    """(the backend's fp32 matmul setting, the setting it inherits from when unset) of the new API, or None."""
    if device_type == "cuda":
        return torch.backends.cuda.matmul, torch.backends.cudnn  # ("cuda", "matmul"), ("cuda", "all")
    if device_type == "cpu":
        return torch.backends.mkldnn.matmul, torch.backends.mkldnn  # ("mkldnn", "matmul"), ("mkldnn", "all")
    return None


class ieee_fp32_matmul:  # noqa: N801 (a context manager, named like torch.no_grad)
    """Scope in which fp32 matmuls on `device_type` are IEEE fp32 products, whatever the process-wide TF32 / bf16
    setting, set through either API (torch.backends.cuda.matmul.allow_tf32, torch.set_float32_matmul_precision,
    or the `fp32_precision` settings of torch >= 2.9).

    PyTorch has no per-call or thread-local precision, so the setting is process-wide: it is read (a C++ getter)
    and written only when it allows reduced precision (never by default), and then once per fused op, not per
    chunk (the ops enter this scope around their chunk loops). With the new API only the backend's own matmul
    setting is written ("ieee", then back): the legacy flag is never read or written, as mixing the two APIs
    raises. Inside a torch.library custom op the scope runs eagerly, also under torch.compile.
    """

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.restore = None  # (setting, value) to put back on exit, when entering changed it

    def __enter__(self):
        if not _FP32_PRECISION_API:
            if self.device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
                torch.backends.cuda.matmul.allow_tf32 = False
                self.restore = (torch.backends.cuda.matmul, True)
            return self
        setting = _fp32_matmul_setting(self.device_type)
        if setting is None:
            return self
        matmul, inherited_from = setting
        current = matmul.fp32_precision  # the effective value: unset ("none") if it is what it inherits
        if current in _REDUCED_FP32_PRECISION:
            self.restore = (matmul, "none" if inherited_from.fp32_precision == current else current)
            matmul.fp32_precision = "ieee"
        return self

    def __exit__(self, *exc) -> None:
        if self.restore is not None:
            setting, value = self.restore
            if _FP32_PRECISION_API:
                setting.fp32_precision = value
            else:
                setting.allow_tf32 = value
            self.restore = None


def fp32_products(device: torch.device, *dot_dtypes: torch.dtype):
    """`ieee_fp32_matmul` where some product is an fp32 matmul on `device` (an fp32 dot dtype; on the CPU, whose
    16-bit operands are widened to fp32, any); else a null context (tensor-core products ignore the setting)."""
    if device.type == "cpu" or torch.float32 in dot_dtypes:
        return ieee_fp32_matmul(device.type)
    return contextlib.nullcontext()


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n] -> fp32 [m, n]: products in the operands' (common) dtype, fp32 accumulation and result.
    CUDA: cuBLAS with an fp32 output (16-bit operands) or IEEE fp32 (`ieee_fp32_matmul`); CPU: the 16-bit operands
    widened to fp32 (their products are exact there), the same function."""
    no_autocast = torch.autocast(a.device.type, enabled=False) if a.device.type in ("cpu", "cuda") \
        else contextlib.nullcontext()
    with no_autocast:
        if a.dtype != torch.float32 and on_gpu(a.device):
            return torch.mm(a, b, out_dtype=torch.float32)
        with ieee_fp32_matmul(a.device.type):
            return a @ b if a.dtype == torch.float32 else a.float() @ b.float()


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def chunk_rows(k: int, device: torch.device, cpu_rows: int = 16) -> int:
    """Rows per chunk of the [rows, k] fp32 intermediates: 2^24 elements (64 MiB) on the GPU, so that the
    library GEMMs stay large (>= 4096 x 4096 x 512 at K = 4096) while the chunk's few buffers stay a small
    fraction of the loss's memory; a few rows on the CPU, so that the tests span several chunks."""
    return max(1, 2**24 // k) if on_gpu(device) else cpu_rows
