"""Synthetic backend for benchmarks: random normalised views generated on the device, no files.

Batch (epoch, step) of rank r is a fixed function of (seed, epoch, r, step), so it resumes exactly.
"""
from __future__ import annotations

import torch

from moca_fast.data.sharding import EpochShard, LoaderPosition, sample_seed

IMAGENET_TRAIN_IMAGES = 1_281_167


class SyntheticTwoViewLoader(LoaderPosition):
    """Yields (x1, x2): float32 [B, 3, S, S] on `device`, standard-normal like normalised images."""

    backend = "synthetic"

    def __init__(self, cfg, rank: int, world_size: int, device, num_images: int = IMAGENET_TRAIN_IMAGES):
        self.device = torch.device(device)
        self.num_images = num_images
        self.skipped: list[tuple[str, str]] = []
        self.shard = EpochShard(num_images, rank, world_size, cfg.batch_size, cfg.seed, source="synthetic data")
        self.shape = (2, cfg.batch_size, 3, cfg.img_size, cfg.img_size)
        self._generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        return self.shard.steps

    def __iter__(self):
        while self.step < len(self):
            self._generator.manual_seed(sample_seed(self.shard.seed, self.epoch, self.shard.rank, self.step))
            views = torch.randn(self.shape, generator=self._generator, device=self.device)
            self.step += 1
            yield views[0], views[1]
