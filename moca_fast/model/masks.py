"""Two complementary masking rounds (the official make_two_complementary_masks semantics).

A round is a permutation ids_shuffle [N, L]: its first len_keep entries are the encoder-visible tokens,
its first len_dec entries the decoder positions. Round 1 keeps k1 tokens and decodes d1; round 2's
encoder sees k2 tokens taken outside round 1's decoder positions, and its decoder positions are its own
visible tokens plus round 1's d1 - k1 extra positions.
"""
from __future__ import annotations

import torch


def make_two_complementary_masks(n: int, L: int, len_keep: tuple[int, int], len_dec: tuple[int, int],
                                 device=None, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Returns [ids_shuffle_round1, ids_shuffle_round2], each a LongTensor [n, L]."""
    k1, k2 = len_keep
    d1 = len_dec[0]
    noise = torch.rand(n, L, device=device, generator=generator)
    ids1 = torch.argsort(noise, dim=1)
    enc1, extra, rest = ids1[:, :k1], ids1[:, k1:d1], ids1[:, d1:]
    ids2 = torch.cat([rest[:, :k2], extra, rest[:, k2:], enc1], dim=1)
    return [ids1, ids2]
