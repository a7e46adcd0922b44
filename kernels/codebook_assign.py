"""Teacher soft codebook assignment without the [N*L, K] code matrix.

Function (the reference is `assign_reference` of moca_fast.reference_ops, minus its codes):
  x̂ = x / max(|x|, 1e-5), cos = x̂ W^T, codes = softmax_K(inv_temp * cos),
  bow [N, K] = L1-normalise(mean of the codes of the interior tokens),
  stat = |mean over all N*L tokens of (max_K cos - mean_K cos)|.

Per chunk of whole images (2^24 cosines on the GPU), no atomics (deterministic):
1. one library GEMM (cuBLAS, wgmma on Hopper) with an fp32 result: X W^T [T, K] of the chunk's T tokens;
2. `_token_stats_kernel`, one program per token: scales its row by 1/|x| and writes the per-token state
   lse = logsumexp_K(inv_temp * cos) and the gap max_K cos - mean_K cos;
3. `_bow_kernel`, one program per (image, block of words): sums exp(inv_temp * cos - lse) over the image's
   interior tokens, i.e. the mean interior code of each word, written once.
The statistic and the L1 normalisation are then [N*L] and [N, K] torch reductions.

Analytic figures at ViT-B/16 batch 256 (both views: 100,352 tokens, K = 4096, C = 768; ceilings of DESIGN.md §4,
H200), not speeds: the GEMM 0.63 TFLOP = 0.81 ms; the cosines written once and read 1 + 100/196 times in fp32,
~10 B per element = 4.1 GB = 0.98 ms (when a chunk does not stay in L2); floor ~1.8 ms against eager's 6.8 ms.
The previous design (two Triton passes, each recomputing the cosines with mma.sync tiles) did 1.1 TFLOP.
Compile-time figures (bench/compile.py, sm_90a, triton 3.8; not speeds), bf16 and fp32 alike (the kernels read
the fp32 GEMM result): `_token_stats_kernel` 48 registers at 8 warps, `_bow_kernel` 56 at 4, no spills, <= 32
bytes of shared memory, no dot. The previous two kernels: wgmma in bf16 (64-token tiles) at 93 and 116
registers, 72 KB of shared memory, and no tensor cores in fp32 (212 and 182 registers).

With 16-bit products (moca_fast.kernels.matmul_dtype) the tokens and words are rounded to that dtype and |x| is
the norm of the rounded token: the kernels compute the function above of the rounded operands, to fp32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moca_fast.kernels import chunk_rows, fp32_products, launch, matmul_dtype, mm_f32, on_gpu, runs_triton
from moca_fast.reference_ops import NORM_EPS
from moca_fast.reference_ops import assign_reference


@triton.jit
def _token_stats_kernel(cos_ptr, rnorm_ptr, inv_temp_ptr, lse_ptr, gap_ptr, K, stride_cos,
                        BLOCK_K: tl.constexpr):
    """One token per program: its row x W^T [K] (fp32) and 1/|x| -> lse and gap."""
    t = tl.program_id(0).to(tl.int64)
    rnorm = tl.load(rnorm_ptr + t)
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    m = float("-inf")
    s = 0.0
    cos_max = float("-inf")
    cos_sum = 0.0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        cos = tl.load(cos_ptr + t * stride_cos + k, mask=k_ok, other=0.0) * rnorm
        cos_max = tl.maximum(cos_max, tl.max(tl.where(k_ok, cos, float("-inf")), axis=0))
        cos_sum += tl.sum(cos, axis=0)
        logits = tl.where(k_ok, cos * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + t, m + tl.log(s))
    tl.store(gap_ptr + t, cos_max - cos_sum / K)


@triton.jit
def _bow_kernel(cos_ptr, rnorm_ptr, inv_temp_ptr, lse_ptr, interior_ptr, bow_ptr, L, K, I, stride_cos,
                BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (image n of the chunk, words k): the mean over the interior tokens of their codes of words k."""
    n = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_ok = i < I
        t = n.to(tl.int64) * L + tl.load(interior_ptr + i, mask=i_ok, other=0).to(tl.int64)
        rnorm = tl.load(rnorm_ptr + t, mask=i_ok, other=0.0)
        lse = tl.load(lse_ptr + t, mask=i_ok, other=0.0)
        ok = i_ok[:, None] & k_ok[None, :]
        cos = tl.load(cos_ptr + t[:, None] * stride_cos + k[None, :], mask=ok, other=0.0)
        codes = tl.exp(cos * (rnorm * inv_temp)[:, None] - lse[:, None])
        acc += tl.sum(tl.where(ok, codes, 0.0), axis=0)
    tl.store(bow_ptr + n.to(tl.int64) * K + k, acc / I, mask=k_ok)


def _blocks(device: torch.device) -> dict:
    if on_gpu(device):
        return dict(stats=dict(BLOCK_K=4096, num_warps=8), bow=dict(BLOCK_I=8, BLOCK_K=512, num_warps=4))
    return dict(stats=dict(BLOCK_K=32), bow=dict(BLOCK_I=16, BLOCK_K=32))  # interpreter: tests span blocks


def launch_assign(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor, interior: torch.Tensor,
                  dot_dtype: torch.dtype, lse: torch.Tensor, gap: torch.Tensor, rnorm: torch.Tensor,
                  bow_mean: torch.Tensor) -> None:
    """Fills the per-token state lse, gap, rnorm [N*L] and bow_mean [N, K] (the mean interior code, before the
    L1 normalisation), chunk by chunk of whole images. words: [K, C]."""
    N, L, C = tokens.shape
    K, I = words.shape[0], interior.numel()
    b = _blocks(tokens.device)
    w_t = words.to(dot_dtype).t()
    images = max(1, chunk_rows(K, tokens.device) // L)
    with fp32_products(tokens.device, dot_dtype):  # one precision scope for every chunk's GEMM
        for n0 in range(0, N, images):
            n1 = min(N, n0 + images)
            t0, t1 = n0 * L, n1 * L
            x = tokens[n0:n1].reshape(-1, C).to(dot_dtype)
            rnorm[t0:t1] = 1.0 / x.float().norm(dim=1).clamp_min(NORM_EPS)
            cos = mm_f32(x, w_t)
            launch(_token_stats_kernel, (t1 - t0,), cos, rnorm[t0:t1], inv_temp, lse[t0:t1], gap[t0:t1], K,
                   cos.stride(0), **b["stats"])
            launch(_bow_kernel, (n1 - n0, triton.cdiv(K, b["bow"]["BLOCK_K"])), cos, rnorm[t0:t1], inv_temp,
                   lse[t0:t1], interior, bow_mean[n0:n1], L, K, I, cos.stride(0), **b["bow"])


@torch.library.custom_op("moca_fast::codebook_assign", mutates_args=())
def _codebook_assign_op(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor, interior: torch.Tensor,
                        dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    N, L, _ = tokens.shape
    state = torch.empty(3, N * L, device=tokens.device, dtype=torch.float32)
    bow_mean = torch.empty(N, words.shape[0], device=tokens.device, dtype=torch.float32)
    launch_assign(tokens, words, inv_temp.float(), interior.contiguous(), dot_dtype, *state, bow_mean)
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
