"""Fused Triton kernels of the fast path, installed as moca_fast.kernels.

One module per op, each holding its Triton kernels, the torch.library custom op (autograd and fake
registrations, so torch.compile traces around it) and the plain PyTorch reference of the same function:
- codebook_assign: teacher soft codebook assignment -> bag-of-words + dist_norm statistic;
- soft_ce: KL(target || softmax(kappa f P^T)), with dense targets or with teacher codes recomputed in-kernel.

Where the kernels run: CUDA tensors; CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set
before triton is first imported, as the tests do). Elsewhere the ops compute their PyTorch reference
(logged once): same values, [rows, K] intermediates and all.

Matmul precision (`matmul_dtype`): a bf16/fp16 input, or autocast to bf16/fp16 on the input's device (what
the reference's F.linear / matmul would then use), gives tensor-core products in that dtype with fp32
accumulation; otherwise products are exact fp32 ("ieee", no TF32). Softmax, log-sum-exp and reductions
are always fp32.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

log = logging.getLogger(__name__)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_fallback_logged: set[str] = set()
INTERPRET_HINT = "set TRITON_INTERPRET=1 before triton is first imported (torchvision imports it)"


def interpreted(kernel) -> bool:
    """True when `kernel` and Triton's own library (tl.zeros, ...) were both decorated with Triton's interpreter
    on, i.e. TRITON_INTERPRET=1 was set before triton was first imported (torchvision imports it): the kernel
    then runs on CPU tensors."""
    return isinstance(kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def runs_triton(kernel, device: torch.device, op: str) -> bool:
    """Whether `kernel` can run on `device`; logs once per op when the PyTorch reference stands in."""
    if device.type == "cuda" or (device.type == "cpu" and interpreted(kernel)):
        return True
    if op not in _fallback_logged:
        _fallback_logged.add(op)
        log.warning("moca_fast.kernels.%s: no Triton on %s (to run the kernels on CPU, %s); using the PyTorch "
                    "reference", op, device.type, INTERPRET_HINT)
    return False


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the products of x with fp32 weights: x's own 16-bit dtype, the autocast dtype, or fp32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return torch.float32


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


@triton.jit
def round_to(a, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """a rounded to DOT_DTYPE, to nearest even as on the GPU (the interpreter truncates fp32 -> bf16, so there
    the rounding is done on the bits and the value stays an fp32 holding a bf16 number)."""
    if INTERPRET:
        if DOT_DTYPE == tl.bfloat16 and a.dtype == tl.float32:
            bits = a.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = a.to(DOT_DTYPE)
    else:
        out = a.to(DOT_DTYPE)
    return out


@triton.jit
def mma(a, b, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """a [R, E] @ b [E, S] -> [R, S] fp32 accumulation, the operands rounded to DOT_DTYPE first."""
    a = round_to(a, DOT_DTYPE, INTERPRET)
    b = round_to(b, DOT_DTYPE, INTERPRET)
    if INTERPRET:
        # The interpreter's tl.dot mis-reads 16-bit floats; fp32 products of the rounded values are exact.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT_DTYPE == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def mma_split(a, b, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """mma with the fp32 operand a kept to ~16 significant bits as a_hi + a_lo (two 16-bit products)."""
    if DOT_DTYPE == tl.float32:
        out = mma(a, b, DOT_DTYPE, INTERPRET)
    else:
        a_hi = round_to(a, DOT_DTYPE, INTERPRET).to(tl.float32)
        out = mma(a_hi, b, DOT_DTYPE, INTERPRET) + mma(a - a_hi, b, DOT_DTYPE, INTERPRET)
    return out
