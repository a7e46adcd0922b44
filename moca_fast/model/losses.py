"""Teacher targets and the two KL losses: the reference (pure PyTorch) path and the fast-path dispatch.

The reference functions (moca_fast.reference_ops) define the semantics; the fused Triton ops in moca_fast.kernels
compute the same functions without materialising [rows, K] tensors and are checked against them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from moca_fast.reference_ops import assign_reference, soft_target_kl_reference


@dataclass
class TeacherTargets:
    """Targets of one step for the student views cat(view1, view2) ([2B] images).

    bow: [2B, K] cross-view bag-of-words (row b: the bow of the *other* view of image b).
    codes: [2B, L, K] same-view soft codes (reference path), or None.
    tokens: [2B, L, C] teacher final patch tokens (fast path: codes are recomputed inside the loss), fp32, or in the
        16-bit `products` dtype when there is one: the fused dense loss rounds them to it anyway, so storing them
        rounded gives the same loss at half the memory.
    words: [K, C] codebook before this step's update; inv_temp: [1] = inv_delta / dist_norm_prev.
    products: the dtype of the fused ops' teacher products (see `teacher_products`), or None.
    """

    bow: torch.Tensor
    codes: torch.Tensor | None
    tokens: torch.Tensor | None
    words: torch.Tensor
    inv_temp: torch.Tensor
    products: torch.dtype | None = None


def teacher_products(device: torch.device, products: torch.dtype | None):
    """The context the fused ops take their teacher products' dtype from (moca_fast.kernels.matmul_dtype):
    autocast to `products` (the dtype the teacher ran under), or none (the caller's autocast) for None.
    Without it a bf16 run's fp32 tokens outside autocast (the trainer) would give exact fp32 products."""
    if products is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=products)


def teacher_targets(tokens1: torch.Tensor, tokens2: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor,
                    interior: torch.Tensor, impl: str,
                    products: torch.dtype | None = None) -> tuple[TeacherTargets, list[torch.Tensor]]:
    """Targets of both views; tokens_v: [B, L, C]. Returns (targets, [stat_view1, stat_view2]).
    products: the fused ops' teacher product dtype (`teacher_products`); the reference ignores it."""
    if impl == "fast":
        from moca_fast.kernels.codebook_assign import codebook_assign  # triton: only on the fast path

        with teacher_products(tokens1.device, products):
            bow1, stat1 = codebook_assign(tokens1, words, inv_temp, interior)
            bow2, stat2 = codebook_assign(tokens2, words, inv_temp, interior)
        codes, tokens = None, torch.cat([t.to(products or t.dtype) for t in (tokens1, tokens2)])
    else:
        codes1, bow1, stat1 = assign_reference(tokens1, words, inv_temp, interior)
        codes2, bow2, stat2 = assign_reference(tokens2, words, inv_temp, interior)
        codes, tokens = torch.cat([codes1, codes2]), None
    return TeacherTargets(torch.cat([bow2, bow1]), codes, tokens, words, inv_temp, products), [stat1, stat2]


def image_loss(avg: torch.Tensor, prototypes: torch.Tensor, kappa: float, targets: TeacherTargets,
               impl: str) -> torch.Tensor:
    """Cross-view loss of one masking round; avg: [2B, C] student [AVG] embeddings."""
    if impl == "fast":
        from moca_fast.kernels.soft_ce import soft_target_kl

        return soft_target_kl(avg, prototypes, kappa, targets.bow)
    return soft_target_kl_reference(avg, prototypes, kappa, targets.bow)


def dense_loss(dec: torch.Tensor, prototypes: torch.Tensor, kappa: float, targets: TeacherTargets,
               dec_ids: torch.Tensor, impl: str) -> torch.Tensor:
    """Same-view loss of one masking round.

    dec: [2B * n, D] decoder features; dec_ids: [2B, n] their token positions (row b*n + j is token
    dec_ids[b, j] of image b).
    """
    if impl == "fast":
        from moca_fast.kernels.soft_ce import masked_soft_target_kl

        with teacher_products(dec.device, targets.products):
            return masked_soft_target_kl(dec, prototypes, kappa, targets.tokens, dec_ids, targets.words,
                                         targets.inv_temp)
    K = targets.codes.shape[2]
    rows = torch.gather(targets.codes, 1, dec_ids.unsqueeze(-1).expand(-1, -1, K)).reshape(-1, K)
    return soft_target_kl_reference(dec, prototypes, kappa, rows)
