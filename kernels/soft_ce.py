"""KL(target || softmax(kappa f P^T)), batch-mean, forward and backward, in row chunks: never a [M, K] tensor.

Functions (F.kl_div(log_softmax(s), t, "batchmean") with 0 log 0 = 0, s = kappa f P^T [M, K]):
- `soft_target_kl(features [M, D], prototypes [K, D], kappa, target [M, K])`: the image loss (t = bow rows);
- `masked_soft_target_kl(dec [M, D], prototypes, kappa, teacher_tokens [2B, L, C], dec_ids [2B, n], words [K, C],
  inv_temp)`: the dense loss, M = 2B*n, row b*n+j's target t = softmax_K(a), a = inv_temp * cos(teacher token
  dec_ids[b, j], words), recomputed per chunk from the teacher tokens (the teacher codes never exist whole).

Design (in the style of Liger-Kernel's fused linear cross-entropy), per chunk of R rows (R*K = 2^24 on the GPU):
1. library GEMMs (cuBLAS, wgmma on Hopper, no padding of D = 768 or 512) with fp32 results: S = f P^T [R, K] and,
   for the dense loss, A = x W^T [R, K] of the gathered teacher tokens x (scaled by inv_temp / |x| in step 2);
2. one Triton pass per row (`_kl_fwd_kernel`): the log-sum-exps of kappa S and of A, the row's KL, and the
   logits' gradient G = (sum_k t) softmax(kappa S) - t, written in 16 bits (fp16 in bf16 runs) or fp32;
3. library GEMMs for the gradients, in the forward: d_f = (kappa / M) G P, d_P += (kappa / M) G^T f (with bf16
   operands in fp16, see `_gradient_operand`).
The backward only scales the stored fp32 gradients by the upstream gradient. Each teacher logit is computed
once (the one-pass flash-style design recomputes A in the forward, the backward and the d_P pass).

Why this design, at ViT-B/16 batch 256 (dense loss, both rounds: M = 110,080 rows, K = 4096, D = 512, C = 768),
against the ceilings of DESIGN.md §4 (H200: 777 TFLOP/s bf16, 4.18 TB/s) -- analytic figures, not speeds:
- chunked (this file): 2.08 TFLOP (S 0.46, A 0.69, d_f 0.46, d_P 0.46: the dense loss's minimum) = 2.67 ms, plus
  22 B per [M, K] element through HBM when a chunk does not stay in the 50 MB L2 (S and A written and read in
  fp32, G written and read twice in 16 bits): 9.9 GB = 2.37 ms; operands ~1.2 GB = 0.3 ms. Floor ~5.3 ms
  (above the issue's 4.9 ms target unless L2 keeps part of each chunk; nothing here has been timed);
  its GEMMs are the library's and its one Triton kernel has no dot, so nothing rests on Triton's codegen.
- one-pass flash style (the previous design): no [M, K] bytes, but S and A recomputed in the backward: >= 3.23
  TFLOP = 4.16 ms at the ceiling, 4.39 TFLOP = 5.6 ms with d_P as a separate pass over the rows (as it was:
  without atomics), and only reached if a Triton kernel with two softmaxes in its inner loop ran wgmma near
  peak; compiled for sm_90a it did not lower to wgmma at all (16-32-row tiles) and its image-loss forward
  failed to compile (TritonGPUOptimizeThreadLocality), see bench/compile.py.
The one-pass floor is lower only at a wgmma peak its Triton kernels are far from (compile figures below); the
chunked floor rests on cuBLAS GEMMs and one bandwidth-bound pass, so it is the one kept. The row chunk
(`moca_fast.kernels.chunk_rows`) trades the HBM round trip against GEMM size: the first knob to tune on a GPU.

Compile-time figures (bench/compile.py: sm_90a, triton 3.8, ViT-B/16 batch 256, image and dense loss, bf16 and
fp32; not speeds): `_kl_fwd_kernel` compiles in every variant and autotune config; 92-96 / 54-61 / 38-40
registers at 4 / 8 / 16 warps, no spills, 16-64 bytes of shared memory, no dot (its GEMMs are cuBLAS's). The
previous one-pass kernels: image-loss forward did not compile (TritonGPUOptimizeThreadLocality assertion), the
other five compiled to mma.sync (no wgmma: 16-32-row tiles) with 168-253 registers (bf16), 67-117 KB of shared
memory, and the fp32 dense forward spilled 23 KB.

Precision (see moca_fast.kernels): the products round their operands to the product dtype and accumulate in
fp32; S and A are fp32; G enters the gradient GEMMs rounded to 16 bits. In bf16 runs G and the GEMMs' other
operands (exactly rescaled by a power of two) are fp16: G rounded to bf16 moved d_f and d_P by up to 8e-3 of
their largest entry in the tests (too near the 1e-2 bar); fp16 G costs nothing more (same tensor-core rate, a
[M, D] / [K, D] rescale) and leaves mainly the gradients' own rounding to bf16. kappa / M and the upstream
gradient multiply fp32 results.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moca_fast.kernels import chunk_rows, fp32_products, launch, matmul_dtype, mm_f32, on_gpu, runs_triton
from moca_fast.reference_ops import NORM_EPS
from moca_fast.reference_ops import soft_target_kl_reference


@triton.jit
def _kl_fwd_kernel(s_ptr, a_ptr, a_scale_ptr, tgt_ptr, g_ptr, kl_ptr, K, kappa, stride_s, stride_a, stride_t,
                   stride_g, TEACHER: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row per program. s: the row's f P^T [K] (fp32); TEACHER: a (x W^T, fp32) with its scale inv_temp / |x|,
    else the target row t. Writes the row's KL and, if WRITE_GRAD, g = (sum_k t) softmax(kappa s) - t."""
    row = tl.program_id(0).to(tl.int64)
    m_s = float("-inf")
    l_s = 0.0
    m_t = float("-inf")
    l_t = 0.0  # sum_k e^(a - m_t), or sum_k t
    acc = 0.0  # sum_k e^(a - m_t) (a - kappa s), or sum_k t (log t - kappa s)
    a_scale = tl.load(a_scale_ptr + row) if TEACHER else 1.0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        s = tl.load(s_ptr + row * stride_s + k, mask=k_ok, other=float("-inf")) * kappa
        m_new = tl.maximum(m_s, tl.max(s, axis=0))
        l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m_s = m_new
        s0 = tl.where(k_ok, s, 0.0)
        if TEACHER:
            a = tl.load(a_ptr + row * stride_a + k, mask=k_ok, other=float("-inf")) * a_scale
            m_new = tl.maximum(m_t, tl.max(a, axis=0))
            e = tl.exp(a - m_new)
            rescale = tl.exp(m_t - m_new)
            l_t = l_t * rescale + tl.sum(e, axis=0)
            acc = acc * rescale + tl.sum(e * (tl.where(k_ok, a, 0.0) - s0), axis=0)
            m_t = m_new
        else:
            t = tl.load(tgt_ptr + row * stride_t + k, mask=k_ok, other=0.0).to(tl.float32)
            acc += tl.sum(t * tl.log(tl.where(t > 0, t, 1.0)) - t * s0, axis=0)  # 0 log 0 = 0
            l_t += tl.sum(t, axis=0)
    lse_s = m_s + tl.log(l_s)
    if TEACHER:
        lse_t = m_t + tl.log(l_t)
        tl.store(kl_ptr + row, acc / l_t - lse_t + lse_s)
    else:
        tl.store(kl_ptr + row, acc + l_t * lse_s)
    if WRITE_GRAD:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            p = tl.exp(tl.load(s_ptr + row * stride_s + k, mask=k_ok, other=float("-inf")) * kappa - lse_s)
            if TEACHER:
                a = tl.load(a_ptr + row * stride_a + k, mask=k_ok, other=float("-inf")) * a_scale
                g = p - tl.exp(a - lse_t)
            else:
                g = l_t * p - tl.load(tgt_ptr + row * stride_t + k, mask=k_ok, other=0.0).to(tl.float32)
            tl.store(g_ptr + row * stride_g + k, g.to(g_ptr.dtype.element_ty), mask=k_ok)


# The autotune set: warps per row program, keyed by the row length and the variant, so one run (fixed K) tunes
# once per variant and never again; the chunks' ragged last grid does not change the key.
_kl_fwd_tuned = triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16)],
                                key=["K", "TEACHER", "WRITE_GRAD"])(_kl_fwd_kernel)


def _block_k(k: int, device: torch.device) -> int:
    """Words per tile: the whole row up to 4096 on the GPU (one pass over the loaded row); 32 on the CPU, so the
    tests span several tiles."""
    return min(triton.next_power_of_2(k), 4096) if on_gpu(device) else 32


def _teacher_rows(teacher_tokens, dec_ids, images: slice, x_dot: torch.dtype) -> torch.Tensor:
    """The teacher tokens of the rows of `images`, [images * n, C] in x_dot: row b*n + j is token dec_ids[b, j]."""
    ids = dec_ids[images]
    batch = torch.arange(images.start, images.stop, device=ids.device).unsqueeze(1)
    return teacher_tokens[batch, ids].flatten(0, 1).to(x_dot)


def kl_forward(features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot,
               need_grad):
    """-> (loss, d_features [M, D] fp32, d_prototypes [K, D] fp32), the gradients of the loss itself (upstream 1;
    [0]-sized when not need_grad). Chunks of whole images' rows for the dense loss."""
    f, p = features.to(f_dot).contiguous(), prototypes.to(f_dot).contiguous()
    (M, D), K = f.shape, p.shape[0]
    teacher = teacher_tokens is not None
    rows = chunk_rows(K, f.device)
    if teacher:
        n = dec_ids.shape[1]
        rows = max(1, rows // n) * n
        w_t = words.to(x_dot).t()
        inv_temp = inv_temp.float()
    kl = torch.empty(M, device=f.device, dtype=torch.float32)
    d_f = torch.empty(M if need_grad else 0, D, device=f.device, dtype=torch.float32)
    d_p = torch.zeros(K if need_grad else 0, D, device=f.device, dtype=torch.float32)
    kernel = _kl_fwd_tuned if on_gpu(f.device) else _kl_fwd_kernel
    if need_grad:
        f_scale, p_scale = _gradient_scale(f), _gradient_scale(p)
        p_g = _gradient_operand(p, p_scale)
    with fp32_products(f.device, f_dot, x_dot):  # one precision scope for every chunk's GEMMs
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            s = mm_f32(f[r0:r1], p.t())
            if teacher:
                x = _teacher_rows(teacher_tokens, dec_ids, slice(r0 // n, r1 // n), x_dot)
                a = mm_f32(x, w_t)
                a_scale = inv_temp / x.float().norm(dim=1).clamp_min(NORM_EPS)
                tgt = s  # unused
            else:
                a, a_scale, tgt = s, s, target[r0:r1]  # a, a_scale unused
            g = torch.empty(s.shape, device=f.device, dtype=p_g.dtype) if need_grad else s  # unused without need_grad
            launch(kernel, (r1 - r0,), s, a, a_scale, tgt, g, kl[r0:r1], K, kappa, s.stride(0), a.stride(0),
                   tgt.stride(0), g.stride(0), TEACHER=teacher, WRITE_GRAD=need_grad, BLOCK_K=_block_k(K, f.device))
            if need_grad:
                d_f[r0:r1] = mm_f32(g, p_g)
                d_p += mm_f32(g.t(), _gradient_operand(f[r0:r1], f_scale))
    if need_grad:
        d_f.mul_(p_scale * (kappa / M))
        d_p.mul_(f_scale * (kappa / M))
    return kl.sum() / M, d_f, d_p


def _gradient_scale(t: torch.Tensor) -> torch.Tensor:
    """The power of two that brings max |t| of a bf16 operand into fp16's range (on the device, no sync); 1 else."""
    if t.dtype != torch.bfloat16:
        return torch.ones((), device=t.device)
    return torch.exp2(torch.ceil(torch.log2(t.abs().amax().float() / 2.0**14)).clamp_min(0.0))


def _gradient_operand(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale in the gradient GEMMs' dtype: bf16 operands go to fp16, exactly (8 significant bits fit in 11),
    so that the logits' gradient G can be fp16 too: 2^-11 relative rounding instead of bf16's 2^-8."""
    if t.dtype != torch.bfloat16:
        return t
    return (t / scale.to(t.dtype)).to(torch.float16)


@torch.library.custom_op("moca_fast::soft_target_kl", mutates_args=())
def _kl_fwd_op(features: torch.Tensor, prototypes: torch.Tensor, kappa: float, target: Optional[torch.Tensor],
               teacher_tokens: Optional[torch.Tensor], dec_ids: Optional[torch.Tensor], words: Optional[torch.Tensor],
               inv_temp: Optional[torch.Tensor], f_dot: torch.dtype, x_dot: torch.dtype, need_grad: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = None if target is None else target.contiguous()
    return kl_forward(features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot,
                      need_grad)


@_kl_fwd_op.register_fake
def _(features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot, need_grad=True):
    (M, D), K = features.shape, prototypes.shape[0]
    return features.new_empty((), dtype=torch.float32), \
        features.new_empty((M if need_grad else 0, D), dtype=torch.float32), \
        features.new_empty((K if need_grad else 0, D), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    features, prototypes = inputs[:2]
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = features.dtype, prototypes.dtype


def _backward(ctx, grad_loss, grad_d_features, grad_d_prototypes):
    d_features, d_prototypes = ctx.saved_tensors
    if d_features.numel() == 0 and d_prototypes.numel() == 0:
        raise RuntimeError("moca_fast.kernels.soft_ce: backward through a forward run with need_grad=False")
    return (grad_loss * d_features).to(ctx.dtypes[0]), (grad_loss * d_prototypes).to(ctx.dtypes[1]), \
        None, None, None, None, None, None, None, None, None


_kl_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _need_grad(features: torch.Tensor, prototypes: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (features.requires_grad or prototypes.requires_grad)


def _check_student(where: str, features: torch.Tensor, prototypes: torch.Tensor, rows: int) -> None:
    if features.dim() != 2 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"moca_fast.kernels.soft_ce.{where}: need features [M, D] and prototypes [K, D], got "
                         f"{list(features.shape)} and {list(prototypes.shape)}")
    if features.shape[0] != rows or rows == 0:
        raise ValueError(f"moca_fast.kernels.soft_ce.{where}: features have {features.shape[0]} rows, the targets "
                         f"{rows} (need the same, > 0)")


def soft_target_kl(features: torch.Tensor, prototypes: torch.Tensor, kappa: float,
                   target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(kappa features prototypes^T)), batch-mean -> 0-dim fp32; gradients for features
    [M, D] and prototypes [K, D]; target [M, K] (no gradient), as `soft_target_kl_reference`."""
    _check_student("soft_target_kl", features, prototypes, target.shape[0])
    if target.shape != (features.shape[0], prototypes.shape[0]):
        raise ValueError(f"moca_fast.kernels.soft_ce.soft_target_kl: target {list(target.shape)} is not "
                         f"[M, K] = [{features.shape[0]}, {prototypes.shape[0]}]")
    if not runs_triton(_kl_fwd_kernel, features.device, "soft_ce"):
        return soft_target_kl_reference(features, prototypes, kappa, target)
    return _kl_fwd_op(features, prototypes, float(kappa), target.detach(), None, None, None, None,
                      matmul_dtype(features), torch.float32, _need_grad(features, prototypes))[0]


def masked_soft_target_kl(dec: torch.Tensor, prototypes: torch.Tensor, kappa: float, teacher_tokens: torch.Tensor,
                          dec_ids: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """The dense loss: KL(teacher codes of the decoded tokens || softmax(kappa dec prototypes^T)), batch-mean.

    dec: [M = 2B*n, D]; prototypes: [K, D]; teacher_tokens: [2B, L, C] (any strides); dec_ids: [2B, n] token
    positions; words: [K, C]; inv_temp: [1]. Gradients for dec and prototypes. As `masked_soft_target_kl_reference`.
    """
    _check_student("masked_soft_target_kl", dec, prototypes, dec_ids.numel())
    if teacher_tokens.dim() != 3 or dec_ids.dim() != 2 or dec_ids.shape[0] != teacher_tokens.shape[0] \
            or words.shape != (prototypes.shape[0], teacher_tokens.shape[2]) or inv_temp.numel() != 1:
        raise ValueError("moca_fast.kernels.soft_ce.masked_soft_target_kl: need teacher_tokens [2B, L, C], "
                         f"dec_ids [2B, n], words [K, C], inv_temp [1]; got {list(teacher_tokens.shape)}, "
                         f"{list(dec_ids.shape)}, {list(words.shape)}, {list(inv_temp.shape)}")
    if not runs_triton(_kl_fwd_kernel, dec.device, "soft_ce"):
        return masked_soft_target_kl_reference(dec, prototypes, kappa, teacher_tokens, dec_ids, words, inv_temp)
    return _kl_fwd_op(dec, prototypes, float(kappa), None, teacher_tokens.detach(), dec_ids, words.detach(),
                      inv_temp.detach().float(), matmul_dtype(dec), matmul_dtype(teacher_tokens),
                      _need_grad(dec, prototypes))[0]


def masked_soft_target_kl_reference(dec: torch.Tensor, prototypes: torch.Tensor, kappa: float,
                                    teacher_tokens: torch.Tensor, dec_ids: torch.Tensor, words: torch.Tensor,
                                    inv_temp: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `masked_soft_target_kl` (materialises the [M, K] teacher codes)."""
    images = torch.arange(dec_ids.shape[0], device=dec_ids.device).unsqueeze(1)
    x = F.normalize(teacher_tokens[images, dec_ids].flatten(0, 1).float(), dim=1, eps=NORM_EPS)
    codes = torch.softmax(inv_temp.float() * F.linear(x, words.float()), dim=1)
    return soft_target_kl_reference(dec, prototypes, kappa, codes)
