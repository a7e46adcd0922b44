"""Teacher soft codebook assignment without the [N*L, K] code matrix.

Function (the reference is `assign_reference` of moca_fast.model.losses, minus its codes):
  x̂ = x / max(|x|, 1e-5), cos = x̂ W^T, codes = softmax_K(inv_temp * cos),
  bow [N, K] = L1-normalise(mean of the codes of the interior tokens),
  stat = |mean over all N*L tokens of (max_K cos - mean_K cos)|.

Two kernels, no atomics (deterministic), codes only ever as register tiles:
1. `_token_stats_kernel`, one program per block of tokens, one pass over K with an online log-sum-exp: writes
   the per-token state lse = logsumexp_K(inv_temp * cos), the gap max_K cos - mean_K cos and 1/max(|x|, eps)
   ([N*L] floats each).
2. `_bow_kernel`, one program per (image, block of words): recomputes cos for the image's interior tokens and
   sums exp(inv_temp * cos - lse) over them, i.e. the mean interior code of each word, written once.
The statistic and the L1 normalisation are then [N*L] and [N, K] torch reductions. Splitting the two passes
over K into two kernels (rather than one program per token block with an atomic bow) costs nothing more in
FLOPs (the second pass needs only the interior tokens) and gives each pass its natural parallel axis.

With 16-bit products (moca_fast.kernels.matmul_dtype) the tokens and words are rounded to that dtype and |x| is
the norm of the rounded token: the kernels compute the function above of the rounded operands, to fp32 rounding.

`teacher_logits` and `inv_norm` are the building blocks the dense loss (soft_ce) reuses to recompute the
teacher codes of its rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moca_fast.kernels import matmul_dtype, mma, round_to, runs_triton, tl_dtype
from moca_fast.model.codebook import NORM_EPS
from moca_fast.model.losses import assign_reference

_EPS = tl.constexpr(NORM_EPS)


@triton.jit
def inv_norm(x_ptr, x_row, row_ok, C, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
             DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """1 / max(|x_r|, NORM_EPS) for the rows at element offsets x_row [BLOCK_R] -> [BLOCK_R] fp32, of x as
    rounded to DOT_DTYPE (the values the products see, so that cos is exactly normalised)."""
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + x_row[:, None] + c[None, :] * stride_c, mask=row_ok[:, None] & (c < C)[None, :],
                    other=0.0)
        x = round_to(x, DOT_DTYPE, INTERPRET).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return 1.0 / tl.maximum(tl.sqrt(sumsq), _EPS)


@triton.jit
def teacher_logits(x_ptr, x_row, row_ok, rnorm, w_ptr, k, k_ok, inv_temp, C, stride_c,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """inv_temp * cos of rows x (offsets x_row [BLOCK_R], 1/norm rnorm) with words k [BLOCK_K] of the
    contiguous [K, C] codebook w -> [BLOCK_R, BLOCK_K] fp32, -inf at words k >= K."""
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        x = tl.load(x_ptr + x_row[:, None] + c[None, :] * stride_c, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + k[None, :].to(tl.int64) * C + c[:, None], mask=k_ok[None, :] & c_ok[:, None], other=0.0)
        acc += mma(x, w, DOT_DTYPE, INTERPRET)
    return tl.where(k_ok[None, :], acc * (rnorm * inv_temp)[:, None], float("-inf"))


@triton.jit
def _token_stats_kernel(x_ptr, w_ptr, inv_temp_ptr, lse_ptr, gap_ptr, rnorm_ptr, T, L, C, K,
                        stride_n, stride_l, stride_c, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    x_row = (t // L).to(tl.int64) * stride_n + (t % L).to(tl.int64) * stride_l
    rnorm = inv_norm(x_ptr, x_row, t_ok, C, stride_c, BLOCK_T, BLOCK_C, DOT_DTYPE, INTERPRET)
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    cos_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    cos_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        cos = teacher_logits(x_ptr, x_row, t_ok, rnorm, w_ptr, k, k_ok, 1.0, C, stride_c,
                             BLOCK_T, BLOCK_K, BLOCK_C, DOT_DTYPE, INTERPRET)
        cos_max = tl.maximum(cos_max, tl.max(cos, axis=1))
        cos_sum += tl.sum(tl.where(k_ok[None, :], cos, 0.0), axis=1)
        logits = tl.where(k_ok[None, :], cos * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + t, m + tl.log(s), mask=t_ok)
    tl.store(gap_ptr + t, cos_max - cos_sum / K, mask=t_ok)
    tl.store(rnorm_ptr + t, rnorm, mask=t_ok)


@triton.jit
def _bow_kernel(x_ptr, w_ptr, inv_temp_ptr, lse_ptr, rnorm_ptr, interior_ptr, bow_ptr, L, C, K, I,
                stride_n, stride_l, stride_c, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    n = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_ok = i < I
        pos = tl.load(interior_ptr + i, mask=i_ok, other=0).to(tl.int64)
        t = n * L + pos
        x_row = n.to(tl.int64) * stride_n + pos * stride_l
        rnorm = tl.load(rnorm_ptr + t, mask=i_ok, other=0.0)
        lse = tl.load(lse_ptr + t, mask=i_ok, other=0.0)
        logits = teacher_logits(x_ptr, x_row, i_ok, rnorm, w_ptr, k, k_ok, inv_temp, C, stride_c,
                                BLOCK_I, BLOCK_K, BLOCK_C, DOT_DTYPE, INTERPRET)
        acc += tl.sum(tl.where(i_ok[:, None] & k_ok[None, :], tl.exp(logits - lse[:, None]), 0.0), axis=0)
    tl.store(bow_ptr + n.to(tl.int64) * K + k, acc / I, mask=k_ok)


def _blocks(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_T=64, BLOCK_I=64, BLOCK_K=128, BLOCK_C=64, num_warps=8, num_stages=3)
    return dict(BLOCK_T=16, BLOCK_I=16, BLOCK_K=32, BLOCK_C=16)  # interpreter: small, so tests span blocks


def launch_assign(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor, interior: torch.Tensor,
                  dot_dtype: torch.dtype, lse: torch.Tensor, gap: torch.Tensor, rnorm: torch.Tensor,
                  bow_mean: torch.Tensor) -> None:
    """Runs both kernels, filling the per-token state lse, gap, rnorm [N*L] and bow_mean [N, K] (the mean
    interior code, before the L1 normalisation). words: [K, C] contiguous, in dot_dtype."""
    N, L, C = tokens.shape
    K, I = words.shape[0], interior.numel()
    b = _blocks(tokens.device)
    mode = dict(DOT_DTYPE=tl_dtype(dot_dtype), INTERPRET=tokens.device.type == "cpu")
    warps = {key: b[key] for key in ("num_warps", "num_stages") if key in b}
    strides = tokens.stride()
    _token_stats_kernel[(triton.cdiv(N * L, b["BLOCK_T"]),)](
        tokens, words, inv_temp, lse, gap, rnorm, N * L, L, C, K, *strides,
        BLOCK_T=b["BLOCK_T"], BLOCK_K=b["BLOCK_K"], BLOCK_C=b["BLOCK_C"], **mode, **warps)
    _bow_kernel[(N, triton.cdiv(K, b["BLOCK_K"]))](
        tokens, words, inv_temp, lse, rnorm, interior, bow_mean, L, C, K, I, *strides,
        BLOCK_I=b["BLOCK_I"], BLOCK_K=b["BLOCK_K"], BLOCK_C=b["BLOCK_C"], **mode, **warps)


@torch.library.custom_op("moca_fast::codebook_assign", mutates_args=())
def _codebook_assign_op(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor, interior: torch.Tensor,
                        dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    N, L, _ = tokens.shape
    state = torch.empty(3, N * L, device=tokens.device, dtype=torch.float32)
    bow_mean = torch.empty(N, words.shape[0], device=tokens.device, dtype=torch.float32)
    launch_assign(tokens, words.to(dot_dtype).contiguous(), inv_temp.float(), interior.contiguous(), dot_dtype,
                  *state, bow_mean)
    bow = bow_mean / bow_mean.sum(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return bow, state[1].mean().abs()


@_codebook_assign_op.register_fake
def _(tokens, words, inv_temp, interior, dot_dtype):
    return tokens.new_empty((tokens.shape[0], words.shape[0]), dtype=torch.float32), \
        tokens.new_empty((), dtype=torch.float32)


def _check(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor, interior: torch.Tensor) -> None:
    where = "moca_fast.kernels.codebook_assign"
    if tokens.dim() != 3 or words.dim() != 2 or tokens.shape[2] != words.shape[1]:
        raise ValueError(f"{where}: need tokens [N, L, C] and words [K, C], got {list(tokens.shape)} and "
                         f"{list(words.shape)}")
    if inv_temp.numel() != 1 or interior.dim() != 1 or interior.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: need inv_temp [1] and integer interior [I], got {list(inv_temp.shape)} and "
                         f"{list(interior.shape)} {interior.dtype}")
    if interior.numel() == 0:
        raise ValueError(f"{where}: no interior tokens (skip_offset leaves an empty grid)")
    if len({t.device for t in (tokens, words, inv_temp, interior)}) != 1:
        raise ValueError(f"{where}: tokens, words, inv_temp and interior must be on one device")


def codebook_assign(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor,
                    interior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag-of-words and dist_norm statistic of teacher tokens, no gradient.

    tokens: [N, L, C] bf16/fp16/fp32 (any strides); words: [K, C]; inv_temp: [1]; interior: [I] token ids.
    Returns bow [N, K] fp32 and stat (0-dim fp32), as `codebook_assign_reference`.
    """
    _check(tokens, words, inv_temp, interior)
    if not runs_triton(_token_stats_kernel, tokens.device, "codebook_assign"):
        return codebook_assign_reference(tokens, words, inv_temp, interior)
    return _codebook_assign_op(tokens.detach(), words.detach(), inv_temp.detach(), interior, matmul_dtype(tokens))


def codebook_assign_reference(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor,
                              interior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `codebook_assign` (materialises the [N, L, K] codes)."""
    _, bow, stat = assign_reference(tokens, words, inv_temp, interior)
    return bow, stat
