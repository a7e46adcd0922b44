"""Which images a rank sees in an epoch, the per-sample seeds, and the loader's resumable position.

Shared by every backend so that they shard, seed and resume identically.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np

from moca_fast.errors import ConfigError


def sample_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of the integer keys (stable across processes/runs)."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, epoch: int, rank: int, position: int) -> random.Random:
    """The generator of all augmentation choices of one sample of one rank's epoch."""
    return random.Random(sample_seed(seed, epoch, rank, position))


class EpochShard:
    """Rank `rank`'s disjoint share of a shuffled epoch, in whole batches (drop_last).

    Every epoch all ranks draw the same permutation of the images (seeded with seed + epoch),
    keep its first per_rank * world_size entries and rank r takes every world_size-th from r.
    """

    def __init__(self, num_images: int, rank: int, world_size: int, batch_size: int, seed: int,
                 source: str = "the data set"):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_images, self.rank, self.world_size = num_images, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.per_rank = num_images // world_size
        if self.per_rank < batch_size:
            raise ConfigError(f"{source} has {num_images} usable images, {self.per_rank} per rank over "
                              f"{world_size} ranks: fewer than batch_size={batch_size}")
        self.steps = self.per_rank // batch_size

    def order(self, epoch: int) -> np.ndarray:
        """Image indices [per_rank] of this rank's epoch, in the order they are yielded."""
        perm = np.random.default_rng(self.seed + epoch).permutation(self.num_images)
        return perm[: self.per_rank * self.world_size][self.rank :: self.world_size]


class LoaderPosition:
    """epoch/step bookkeeping of a TwoViewLoader: step = batches already yielded in `epoch`.

    state_dict() is the position of the next batch; after the last batch of epoch e it reads
    {"epoch": e + 1, "step": 0}. set_epoch(e) restarts at step 0 unless the loader already is
    in epoch e (so set_epoch after load_state_dict keeps the resumed step).
    """

    epoch: int = 0
    step: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict:
        if self.step >= len(self):
            return {"epoch": self.epoch + 1, "step": 0}
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= len(self):
            raise ConfigError(f"loader state step={step} is outside this loader's epoch of {len(self)} steps "
                              f"(different data, batch_size or world_size than the checkpoint?)")
        self.epoch, self.step = epoch, step
