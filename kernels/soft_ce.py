"""KL(target || softmax(kappa f P^T)), batch-mean, forward and backward, never a [rows, K] tensor in memory.

Functions (F.kl_div(log_softmax(s), t, "batchmean") with 0 log 0 = 0, s = kappa f P^T [M, K]):
- `soft_target_kl(features [M, D], prototypes [K, D], kappa, target [M, K])`: the image loss (t = bow rows);
- `masked_soft_target_kl(dec [M, D], prototypes, kappa, teacher_tokens [2B, L, C], dec_ids [2B, n], words [K, C],
  inv_temp)`: the dense loss, M = 2B*n, row b*n+j's target t = softmax_K(a), a = inv_temp * cos(teacher token
  dec_ids[b, j], words), recomputed in-kernel from the teacher tokens (the teacher codes never exist in memory).

Kernels (flash-attention style, one pass over K per row block, online log-sum-exp; no atomics):
- forward, one program per block of rows: KL_r = sum_k t (log t - s) + (sum_k t) lse_s for dense targets; with
  teacher codes the identity KL_r = [sum_k t_k (a_k - s_k)] - lse_t + lse_s needs only running maxima and sums of
  both softmaxes, so the teacher's normaliser lse_t is found in the same pass. Each row's state (its KL, lse_s,
  lse_t or sum_k t, and the teacher token's 1/|x|) is written for the backward: this per-row state is what
  makes the teacher codes reusable without storing them (t = exp(a - lse_t) from one recomputed logit).
- backward: g_s = (grad / M) (sum_k t * softmax(s) - t); d_f = kappa g_s P by a program per block of rows
  looping over K, d_P = kappa g_s^T f by a program per (block of words, segment of rows) looping over rows,
  the segments summed in torch. Both recompute s (and the teacher logits a) tile by tile. Why not store the
  teacher codes of the rows instead: at ViT-B/16, batch 256, they are 110,080 x 4096 (0.9 GB in bf16).
The feature dimension D sits whole in a tile (padded to a power of two); the teacher's C is looped in chunks.

Precision (see moca_fast.kernels): with 16-bit products the fp32 g_s enters the backward products as a
16-bit hi + lo pair, so d_f and d_P keep fp32-level accuracy (rounding g_s to bf16 alone would cost
~0.5% of their largest entries); grad / M multiplies after the products, keeping fp16 operands out of underflow.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moca_fast.kernels import matmul_dtype, mma, mma_split, round_to, runs_triton, tl_dtype
from moca_fast.kernels.codebook_assign import inv_norm, teacher_logits
from moca_fast.model.codebook import NORM_EPS
from moca_fast.model.losses import soft_target_kl_reference


@triton.jit
def _student_logits(f, p_ptr, k, k_ok, d, d_ok, kappa, D, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """s = kappa f P_k^T: f [BM, BD] -> (s [BM, BK] fp32, -inf at k >= K; P_k^T [BD, BK])."""
    p = tl.load(p_ptr + k[None, :].to(tl.int64) * D + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    s = mma(f, p, DOT, INTERPRET) * kappa
    return tl.where(k_ok[None, :], s, float("-inf")), p


@triton.jit
def _teacher_rows(ids_ptr, r, r_ok, n_dec, stride_ib, stride_ij, stride_n, stride_l):
    """Element offsets of the teacher tokens of rows r (row b*n_dec + j is token dec_ids[b, j] of image b)."""
    b = (r // n_dec).to(tl.int64)
    pos = tl.load(ids_ptr + b * stride_ib + (r % n_dec) * stride_ij, mask=r_ok, other=0).to(tl.int64)
    return b * stride_n + pos * stride_l


@triton.jit
def _target_tile(tgt_ptr, stride_tgt, x_ptr, x_row, rnorm, w_ptr, inv_temp, r, r_ok, k, k_ok, C, stride_c,
                 TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                 X_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Teacher logits a [BM, BK] (-inf at k >= K) when TEACHER, else the target probabilities (0 outside)."""
    if TEACHER:
        out = teacher_logits(x_ptr, x_row, r_ok, rnorm, w_ptr, k, k_ok, inv_temp, C, stride_c,
                             BLOCK_M, BLOCK_K, BLOCK_C, X_DOT, INTERPRET)
    else:
        out = tl.load(tgt_ptr + r[:, None].to(tl.int64) * stride_tgt + k[None, :],
                      mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    return out


@triton.jit
def _grad_logits(s, tgt, lse_s, t_state, r_ok, k_ok, TEACHER: tl.constexpr):
    """sum_k t * softmax(s) - t [BM, BK], zero outside the valid rows and words: the logits' gradient before
    its scale grad / M, which is applied after the products (it would push 16-bit operands into underflow)."""
    p = tl.exp(s - lse_s[:, None])
    if TEACHER:
        g = p - tl.exp(tgt - t_state[:, None])
    else:
        g = t_state[:, None] * p - tgt
    return tl.where(r_ok[:, None] & k_ok[None, :], g, 0.0)


@triton.jit
def _row_setup(f_ptr, ids_ptr, x_ptr, state_ptr, r, r_ok, d, d_ok, M, D, C, n_dec, stride_ib, stride_ij,
               stride_n, stride_l, stride_c, TEACHER: tl.constexpr, LOAD_RNORM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, X_DOT: tl.constexpr,
               INTERPRET: tl.constexpr):
    """Features f [BM, BD] of rows r, their teacher token offsets and 1/|x| (computed, or read from state)."""
    f = tl.load(f_ptr + r[:, None].to(tl.int64) * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    x_row = tl.zeros([BLOCK_M], dtype=tl.int64)
    rnorm = tl.zeros([BLOCK_M], dtype=tl.float32)
    if TEACHER:
        x_row = _teacher_rows(ids_ptr, r, r_ok, n_dec, stride_ib, stride_ij, stride_n, stride_l)
        if LOAD_RNORM:
            rnorm = tl.load(state_ptr + 3 * M + r, mask=r_ok, other=0.0)
        else:
            rnorm = inv_norm(x_ptr, x_row, r_ok, C, stride_c, BLOCK_M, BLOCK_C, X_DOT, INTERPRET)
    return f, x_row, rnorm


@triton.jit
def _kl_fwd_kernel(f_ptr, p_ptr, kappa, tgt_ptr, stride_tgt, x_ptr, ids_ptr, w_ptr, inv_temp_ptr, state_ptr,
                   M, K, D, C, n_dec, stride_ib, stride_ij, stride_n, stride_l, stride_c,
                   TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_C: tl.constexpr, F_DOT: tl.constexpr, X_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < M
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    f, x_row, rnorm = _row_setup(f_ptr, ids_ptr, x_ptr, state_ptr, r, r_ok, d, d_ok, M, D, C, n_dec, stride_ib,
                                 stride_ij, stride_n, stride_l, stride_c, TEACHER, False, BLOCK_M, BLOCK_C, X_DOT,
                                 INTERPRET)
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32) if TEACHER else 1.0
    m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_k e^(a - m_t) (a - s), or sum_k t (log t - s)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        s, _ = _student_logits(f, p_ptr, k, k_ok, d, d_ok, kappa, D, F_DOT, INTERPRET)
        m_new = tl.maximum(m_s, tl.max(s, axis=1))
        l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_s = m_new
        tgt = _target_tile(tgt_ptr, stride_tgt, x_ptr, x_row, rnorm, w_ptr, inv_temp, r, r_ok, k, k_ok, C,
                           stride_c, TEACHER, BLOCK_M, BLOCK_K, BLOCK_C, X_DOT, INTERPRET)
        if TEACHER:
            m_new = tl.maximum(m_t, tl.max(tgt, axis=1))
            e = tl.exp(tgt - m_new[:, None])
            rescale = tl.exp(m_t - m_new)
            l_t = l_t * rescale + tl.sum(e, axis=1)
            diff = tl.where(k_ok[None, :], tgt, 0.0) - tl.where(k_ok[None, :], s, 0.0)
            acc = acc * rescale + tl.sum(e * diff, axis=1)
            m_t = m_new
        else:
            t_log_t = tgt * tl.log(tl.where(tgt > 0, tgt, 1.0))  # 0 log 0 = 0
            acc += tl.sum(t_log_t - tgt * tl.where(k_ok[None, :], s, 0.0), axis=1)
            l_t += tl.sum(tgt, axis=1)  # sum_k t
    lse_s = m_s + tl.log(l_s)
    if TEACHER:
        lse_t = m_t + tl.log(l_t)
        tl.store(state_ptr + r, acc / l_t - lse_t + lse_s, mask=r_ok)
        tl.store(state_ptr + 2 * M + r, lse_t, mask=r_ok)
        tl.store(state_ptr + 3 * M + r, rnorm, mask=r_ok)
    else:
        tl.store(state_ptr + r, acc + l_t * lse_s, mask=r_ok)
        tl.store(state_ptr + 2 * M + r, l_t, mask=r_ok)
    tl.store(state_ptr + M + r, lse_s, mask=r_ok)


@triton.jit
def _kl_bwd_features_kernel(grad_ptr, f_ptr, p_ptr, kappa, tgt_ptr, stride_tgt, x_ptr, ids_ptr, w_ptr, inv_temp_ptr,
                            state_ptr, df_ptr, M, K, D, C, n_dec, stride_ib, stride_ij, stride_n, stride_l, stride_c,
                            TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, F_DOT: tl.constexpr,
                            X_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < M
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    f, x_row, rnorm = _row_setup(f_ptr, ids_ptr, x_ptr, state_ptr, r, r_ok, d, d_ok, M, D, C, n_dec, stride_ib,
                                 stride_ij, stride_n, stride_l, stride_c, TEACHER, True, BLOCK_M, BLOCK_C, X_DOT,
                                 INTERPRET)
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32) if TEACHER else 1.0
    scale = tl.load(grad_ptr).to(tl.float32) / M
    lse_s = tl.load(state_ptr + M + r, mask=r_ok, other=0.0)
    t_state = tl.load(state_ptr + 2 * M + r, mask=r_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        s, p_t = _student_logits(f, p_ptr, k, k_ok, d, d_ok, kappa, D, F_DOT, INTERPRET)
        tgt = _target_tile(tgt_ptr, stride_tgt, x_ptr, x_row, rnorm, w_ptr, inv_temp, r, r_ok, k, k_ok, C,
                           stride_c, TEACHER, BLOCK_M, BLOCK_K, BLOCK_C, X_DOT, INTERPRET)
        g = _grad_logits(s, tgt, lse_s, t_state, r_ok, k_ok, TEACHER)
        acc += mma_split(g, tl.trans(p_t), F_DOT, INTERPRET)
    d_f = round_to(acc * (kappa * scale), df_ptr.dtype.element_ty, INTERPRET)
    tl.store(df_ptr + r[:, None].to(tl.int64) * D + d[None, :], d_f, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _kl_bwd_prototypes_kernel(grad_ptr, f_ptr, p_ptr, kappa, tgt_ptr, stride_tgt, x_ptr, ids_ptr, w_ptr,
                              inv_temp_ptr, state_ptr, dp_ptr, M, K, D, C, n_dec, stride_ib, stride_ij, stride_n,
                              stride_l, stride_c, TEACHER: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                              F_DOT: tl.constexpr, X_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    segment = tl.program_id(1)
    segments = tl.num_programs(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32) if TEACHER else 1.0
    scale = tl.load(grad_ptr).to(tl.float32) / M
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for r0 in range(segment * BLOCK_M, M, segments * BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        r_ok = r < M
        f, x_row, rnorm = _row_setup(f_ptr, ids_ptr, x_ptr, state_ptr, r, r_ok, d, d_ok, M, D, C, n_dec, stride_ib,
                                     stride_ij, stride_n, stride_l, stride_c, TEACHER, True, BLOCK_M, BLOCK_C, X_DOT,
                                     INTERPRET)
        lse_s = tl.load(state_ptr + M + r, mask=r_ok, other=0.0)
        t_state = tl.load(state_ptr + 2 * M + r, mask=r_ok, other=0.0)
        s, _ = _student_logits(f, p_ptr, k, k_ok, d, d_ok, kappa, D, F_DOT, INTERPRET)
        tgt = _target_tile(tgt_ptr, stride_tgt, x_ptr, x_row, rnorm, w_ptr, inv_temp, r, r_ok, k, k_ok, C,
                           stride_c, TEACHER, BLOCK_M, BLOCK_K, BLOCK_C, X_DOT, INTERPRET)
        g = _grad_logits(s, tgt, lse_s, t_state, r_ok, k_ok, TEACHER)
        acc += mma_split(tl.trans(g), f, F_DOT, INTERPRET)
    out = dp_ptr + segment.to(tl.int64) * K * D + k[:, None].to(tl.int64) * D + d[None, :]
    tl.store(out, acc * (kappa * scale), mask=k_ok[:, None] & d_ok[None, :])


# Rows (BLOCK_M) and words (BLOCK_K) per tile, per kernel, on CUDA by the padded feature width BLOCK_D: sized
# for sm_90 so the fp32 accumulators ([BLOCK_M | BLOCK_K, BLOCK_D]) and the tiles fit registers and shared
# memory (checked by compiling for sm_90 ahead of time; untuned on a GPU). The interpreter gets small blocks,
# so the tests span several of each.
_CUDA_TILES = {  # kernel: {BLOCK_D <= 512, wider}
    "fwd": {False: (32, 64), True: (16, 32)},
    "bwd_features": {False: (32, 32), True: (16, 32)},
    "bwd_prototypes": {False: (32, 32), True: (16, 16)},
}


def _tiles(kernel: str, device: torch.device, block_d: int) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_K=32)
    rows, words = _CUDA_TILES[kernel][block_d > 512]
    return dict(BLOCK_M=rows, BLOCK_K=words, num_warps=8, num_stages=2)


def _dp_segments(device: torch.device, k_blocks: int, row_blocks: int) -> int:
    """Row segments of the d_P kernel: enough programs to fill the GPU (2 on CPU, to exercise the split)."""
    if device.type != "cuda":
        return min(row_blocks, 2)
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, triton.cdiv(programs, k_blocks)))


def _kernel_args(features, prototypes, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot):
    """(pointer args after features and prototypes, shape args, constexprs common to the three kernels)."""
    M, D = features.shape
    K = prototypes.shape[0]
    teacher = teacher_tokens is not None
    dummy = features
    if teacher:
        C = teacher_tokens.shape[2]
        shape = (M, K, D, C, dec_ids.shape[1], *dec_ids.stride(), *teacher_tokens.stride())
        pointers = (dummy, 0, teacher_tokens, dec_ids, words, inv_temp)
    else:
        shape = (M, K, D, 1, 1, 0, 0, 0, 0, 0)
        pointers = (target, target.stride(0), dummy, dummy, dummy, dummy)
    consts = dict(TEACHER=teacher, BLOCK_D=triton.next_power_of_2(D), BLOCK_C=64 if dummy.is_cuda else 16,
                  F_DOT=tl_dtype(f_dot), X_DOT=tl_dtype(x_dot), INTERPRET=features.device.type == "cpu")
    return pointers, shape, consts


def launch_forward(features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot,
                   state) -> None:
    """Fills state [3 (dense) | 4 (teacher), M]: per-row KL, lse_s, sum_k t | lse_t, and the teacher's 1/|x|.
    features [M, D] and prototypes (in f_dot), words (in x_dot) contiguous."""
    pointers, shape, consts = _kernel_args(features, prototypes, target, teacher_tokens, dec_ids, words, inv_temp,
                                           f_dot, x_dot)
    tiles = _tiles("fwd", features.device, consts["BLOCK_D"])
    grid = (triton.cdiv(features.shape[0], tiles["BLOCK_M"]),)
    _kl_fwd_kernel[grid](features, prototypes, kappa, *pointers, state, *shape, **consts, **tiles)


def dp_segments(features: torch.Tensor, prototypes: torch.Tensor) -> int:
    """How many row segments the d_P kernel splits the rows into (the first dim of its partial sums)."""
    (M, D), K = features.shape, prototypes.shape[0]
    tiles = _tiles("bwd_prototypes", features.device, triton.next_power_of_2(D))
    return _dp_segments(features.device, triton.cdiv(K, tiles["BLOCK_K"]), triton.cdiv(M, tiles["BLOCK_M"]))


def launch_backward(grad, features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot,
                    x_dot, state, d_features, d_prototype_parts) -> None:
    """Fills d_features [M, D] and d_prototype_parts [S, K, D] fp32 (to be summed over S row segments)."""
    pointers, shape, consts = _kernel_args(features, prototypes, target, teacher_tokens, dec_ids, words, inv_temp,
                                           f_dot, x_dot)
    M, K = features.shape[0], prototypes.shape[0]
    tiles = _tiles("bwd_features", features.device, consts["BLOCK_D"])
    _kl_bwd_features_kernel[(triton.cdiv(M, tiles["BLOCK_M"]),)](
        grad, features, prototypes, kappa, *pointers, state, d_features, *shape, **consts, **tiles)
    tiles = _tiles("bwd_prototypes", features.device, consts["BLOCK_D"])
    _kl_bwd_prototypes_kernel[(triton.cdiv(K, tiles["BLOCK_K"]), d_prototype_parts.shape[0])](
        grad, features, prototypes, kappa, *pointers, state, d_prototype_parts, *shape, **consts, **tiles)


def _prepared(features, prototypes, target, words, f_dot, x_dot):
    """The kernels' operands: row-major, prototypes and words in their product dtype."""
    return features.contiguous(), prototypes.to(f_dot).contiguous(), \
        None if target is None else target.contiguous(), None if words is None else words.to(x_dot).contiguous()


@torch.library.custom_op("moca_fast::soft_target_kl_fwd", mutates_args=())
def _kl_fwd_op(features: torch.Tensor, prototypes: torch.Tensor, kappa: float, target: Optional[torch.Tensor],
               teacher_tokens: Optional[torch.Tensor], dec_ids: Optional[torch.Tensor], words: Optional[torch.Tensor],
               inv_temp: Optional[torch.Tensor], f_dot: torch.dtype, x_dot: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    f, p, t, w = _prepared(features, prototypes, target, words, f_dot, x_dot)
    M = f.shape[0]
    state = torch.empty(3 if teacher_tokens is None else 4, M, device=f.device, dtype=torch.float32)
    launch_forward(f, p, kappa, t, teacher_tokens, dec_ids, w, inv_temp, f_dot, x_dot, state)
    return state[0].sum() / M, state


@_kl_fwd_op.register_fake
def _(features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot):
    rows = 3 if teacher_tokens is None else 4
    return features.new_empty((), dtype=torch.float32), \
        features.new_empty((rows, features.shape[0]), dtype=torch.float32)


@torch.library.custom_op("moca_fast::soft_target_kl_bwd", mutates_args=())
def _kl_bwd_op(grad: torch.Tensor, features: torch.Tensor, prototypes: torch.Tensor, kappa: float,
               target: Optional[torch.Tensor], teacher_tokens: Optional[torch.Tensor], dec_ids: Optional[torch.Tensor],
               words: Optional[torch.Tensor], inv_temp: Optional[torch.Tensor], f_dot: torch.dtype, x_dot: torch.dtype,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f, p, t, w = _prepared(features, prototypes, target, words, f_dot, x_dot)
    d_features = torch.empty_like(f)
    parts = torch.empty(dp_segments(f, p), *p.shape, device=f.device, dtype=torch.float32)
    launch_backward(grad.float(), f, p, kappa, t, teacher_tokens, dec_ids, w, inv_temp, f_dot, x_dot, state,
                    d_features, parts)
    return d_features, parts.sum(dim=0).to(prototypes.dtype)


@_kl_bwd_op.register_fake
def _(grad, features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot, state):
    return torch.empty_like(features), torch.empty_like(prototypes)


def _setup_context(ctx, inputs, output):
    features, prototypes, kappa, target, teacher_tokens, dec_ids, words, inv_temp, f_dot, x_dot = inputs
    ctx.save_for_backward(features, prototypes, target, teacher_tokens, dec_ids, words, inv_temp, output[1])
    ctx.kappa, ctx.f_dot, ctx.x_dot = kappa, f_dot, x_dot


def _backward(ctx, grad_loss, grad_state):
    features, prototypes, target, teacher_tokens, dec_ids, words, inv_temp, state = ctx.saved_tensors
    d_features, d_prototypes = _kl_bwd_op(grad_loss, features, prototypes, ctx.kappa, target, teacher_tokens,
                                          dec_ids, words, inv_temp, ctx.f_dot, ctx.x_dot, state)
    return d_features, d_prototypes, None, None, None, None, None, None, None, None


_kl_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
    f_dot = matmul_dtype(features)
    return _kl_fwd_op(features, prototypes, float(kappa), target.detach(), None, None, None, None, f_dot,
                      torch.float32)[0]


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
                      inv_temp.detach().float(), matmul_dtype(dec), matmul_dtype(teacher_tokens))[0]


def masked_soft_target_kl_reference(dec: torch.Tensor, prototypes: torch.Tensor, kappa: float,
                                    teacher_tokens: torch.Tensor, dec_ids: torch.Tensor, words: torch.Tensor,
                                    inv_temp: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `masked_soft_target_kl` (materialises the [M, K] teacher codes)."""
    images = torch.arange(dec_ids.shape[0], device=dec_ids.device).unsqueeze(1)
    x = F.normalize(teacher_tokens[images, dec_ids].flatten(0, 1).float(), dim=1, eps=NORM_EPS)
    codes = torch.softmax(inv_temp.float() * F.linear(x, words.float()), dim=1)
    return soft_target_kl_reference(dec, prototypes, kappa, codes)
