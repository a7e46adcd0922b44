"""The online codebook: a FIFO queue of L2-normalised teacher tokens and the dist_norm EMA.

Identical on every rank: in "rank0" mode only rank 0's new words survive (broadcast), reproducing the
official code whose DDP wrapper re-broadcasts rank 0's buffers each forward; in "gather" mode every rank
contributes its words (all-gathered in rank order). The dist_norm statistic is averaged over ranks.
"""
from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moca_fast.distributed import rank_and_world
from moca_fast.reference_ops import NORM_EPS



def interior_token_ids(grid_size: int, offset: int, device=None) -> torch.Tensor:
    """Patch indices (row-major, [CLS] excluded) at least `offset` patches from the grid border: [I]."""
    ids = torch.arange(grid_size * grid_size, device=device).view(grid_size, grid_size)
    if offset > 0:
        ids = ids[offset:-offset, offset:-offset]
    return ids.reshape(-1)


class OnlineCodebook(nn.Module):
    def __init__(self, num_words: int, dim: int, grid_size: int, num_new_words: int = 32, skip_offset: int = 2,
                 inv_delta: float = 10.0, decay: float = 0.99, dist_norm_init: float = 0.5, sync: str = "rank0"):
        super().__init__()
        self.num_new_words = num_new_words
        self.inv_delta = inv_delta
        self.decay = decay
        self.sync = sync
        self.grid_size = grid_size
        self.register_buffer("words", F.normalize(torch.randn(num_words, dim).clamp(min=0), dim=1, eps=NORM_EPS))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("dist_norm", torch.full((1,), dist_norm_init))
        self.register_buffer("dist_norm_prev", torch.full((1,), dist_norm_init))
        self.register_buffer("interior", interior_token_ids(grid_size, skip_offset), persistent=False)

    def inv_temperature(self) -> torch.Tensor:
        """inv_delta / dist_norm_prev: the sharpening of this step's soft assignments, [1]."""
        return self.inv_delta / self.dist_norm_prev

    @torch.no_grad()
    def update_dist_norm(self, stats: torch.Tensor) -> None:
        """EMA of |mean over tokens of (max_K cos - mean_K cos)|, one update per element of `stats` (a scalar
        or one per view, in order), each statistic averaged over ranks (one all-reduce for all of them)."""
        stats = stats.detach().float().abs().reshape(-1).clone()
        _, world = rank_and_world()
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        for stat in stats:
            self.dist_norm.mul_(self.decay).add_(stat, alpha=1.0 - self.decay)

    @staticmethod
    def draw_view(num_views: int = 2) -> int:
        """Which view's teacher tokens give this step's new words, uniformly. Drawn on the host from Python's
        `random` (as the official code draws it; the run checkpoints its state), not from a device tensor,
        so that the step branches on no device value (no host synchronisation)."""
        return int(random.random() * num_views)

    @torch.no_grad()
    def draw_words(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """One random interior token from each of n random images, L2-normalised.

        tokens: [N, L, C] teacher final patch tokens ([CLS] removed) -> [n, C] fp32.
        """
        N = tokens.shape[0]
        if n > N:
            raise ValueError(f"cannot draw {n} new codebook words from {N} images")
        device = tokens.device  # indices drawn on the tokens' device: no host-device copy, no sync
        images = torch.randperm(N, device=device)[:n]
        interior = self.interior.to(device)
        positions = interior[torch.randint(0, interior.numel(), (n,), device=device)]
        return F.normalize(tokens[images, positions].float(), dim=1, eps=NORM_EPS)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        """End-of-step update: draw this rank's words, make them identical on all ranks, enqueue them,
        and make the current dist_norm the one the next step uses. tokens: [N, L, C]."""
        rank, world = rank_and_world()
        new = self.draw_words(tokens, self.num_new_words // world)
        if world > 1:
            if self.sync == "gather":
                parts = [torch.empty_like(new) for _ in range(world)]
                dist.all_gather(parts, new)
                new = torch.cat(parts)
            else:
                dist.broadcast(new, src=0)
        self.enqueue(new)
        self.dist_norm_prev.copy_(self.dist_norm)

    @torch.no_grad()
    def enqueue(self, new: torch.Tensor) -> None:
        """Overwrites the oldest words with `new` [n, C] (K is a multiple of n)."""
        K, n = self.words.shape[0], new.shape[0]
        if K % n:
            raise ValueError(f"codebook size {K} is not a multiple of the {n} words added per step")
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % K  # tensor math: no host sync
        self.words.index_copy_(0, slots, new.to(self.words.dtype))
        self.ptr.add_(n).remainder_(K)
