"""The plain PyTorch references of MOCA's codebook assignment and soft-target KL: they define the semantics
(docs: moca_fast.model.losses); the fused ops of moca_fast.kernels compute the same functions and are tested
against them. Imports torch only, so that both the kernels and the model build on it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5


def assign_reference(tokens: torch.Tensor, words: torch.Tensor, inv_temp: torch.Tensor,
                     interior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft codebook assignment of teacher tokens, in fp32.

    tokens: [N, L, C] ([CLS] removed); words: [K, C]; inv_temp: [1]; interior: [I] patch ids.
    Returns codes [N, L, K] = softmax_K(inv_temp * cos), bow [N, K] = L1-normalised mean of the
    interior codes, and the dist_norm statistic |mean over tokens of (max_K cos - mean_K cos)| (scalar).
    """
    x = F.normalize(tokens.float(), dim=2, eps=NORM_EPS)
    cos = F.linear(x, words.float())
    stat = (cos.max(dim=2).values - cos.mean(dim=2)).mean().abs()
    codes = torch.softmax(inv_temp.float() * cos, dim=2)
    bow = F.normalize(codes[:, interior].mean(dim=1), p=1, dim=1, eps=NORM_EPS)
    return codes, bow, stat


def soft_target_kl_reference(features: torch.Tensor, prototypes: torch.Tensor, kappa: float,
                             target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(kappa * features @ prototypes^T)), summed over K, mean over rows.

    features: [M, D]; prototypes: [K, D]; target: [M, K] probability rows -> scalar (fp32).
    """
    logits = (features.float() * kappa) @ prototypes.float().t()
    return F.kl_div(F.log_softmax(logits, dim=1), target.float(), reduction="batchmean")
