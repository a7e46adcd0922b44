"""Prediction heads: the prototype generator G(W) and the dense-loss decoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moca_fast.model.vit import Block, gather_tokens, sincos_pos_embed_2d
from moca_fast.reference_ops import NORM_EPS


class PrototypeGenerator(nn.Module):
    """G(W) = l2norm(MLP(l2norm(W)) + skip(l2norm(W))); MLP = Linear(C, hidden, no bias) -> BN -> ReLU
    -> Linear(hidden, out); skip = identity (out == C) or Linear(C, out).

    words: [K, C] -> prototypes [K, out].
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.skip = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        x = F.normalize(words, dim=1, eps=NORM_EPS)
        return F.normalize(self.mlp(x) + self.skip(x), dim=1, eps=NORM_EPS)


class DenseDecoder(nn.Module):
    """Predicts per-token features at the decoder positions of one masking round.

    Input sequence: [AVG] + Linear(LayerNorm(intermediate visible tokens)), padded with a learned mask
    token up to len_dec positions, plus fixed sin-cos position embeddings at those positions.
    """

    def __init__(self, enc_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, grid_size: int,
                 eps: float = 1e-6):
        super().__init__()
        self.norm_in = nn.LayerNorm(enc_dim, eps=eps)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid_size).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, avg: torch.Tensor, visible: torch.Tensor, ids_shuffle: torch.Tensor,
                len_dec: int) -> torch.Tensor:
        """avg: [N, C]; visible: [N, 1 + k, C] intermediate encoder tokens ([CLS] first);
        ids_shuffle: [N, L] -> decoder features [N * len_dec, D] (row n*len_dec + j is position
        ids_shuffle[n, j])."""
        x = self.embed(torch.cat([avg.unsqueeze(1), self.norm_in(visible[:, 1:])], dim=1))
        N, n_in, D = x.shape
        mask_tokens = self.mask_token.expand(N, len_dec + 1 - n_in, D)
        tokens = torch.cat([x[:, 1:], mask_tokens], dim=1)
        pos = gather_tokens(self.pos_embed.expand(N, -1, -1), ids_shuffle[:, :len_dec] + 1)
        x = torch.cat([x[:, :1] + self.pos_embed[:, :1], tokens + pos], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:].reshape(-1, D)
