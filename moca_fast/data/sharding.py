"""Which images a rank sees in an epoch, the per-sample seeds, and the loader's resumable position.

Shared by every backend so that they shard, seed and resume identically. The epoch's order, each sample's
seed and the recorded position are global (the same for every number of ranks): with the global batch
batch_size x world_size x grad_accum kept, optimiser step s of an epoch reads the same images with the same
augmentations on any number of ranks, so a run can resume on another world size (moca_fast.train.loop).
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


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The generator of all augmentation choices of the sample at global `position` of an epoch (its index
    in EpochShard's permutation, whichever rank reads it)."""
    return random.Random(sample_seed(seed, epoch, position))


class EpochShard:
    """Rank `rank`'s disjoint share of a shuffled epoch, in whole batches (drop_last).

    Every epoch all ranks draw the same permutation of the images (seeded with seed + epoch),
    keep its first per_rank * world_size entries and rank r takes every world_size-th from r: its
    position p is the permutation's global position r + world_size * p. Micro-batch j of every rank
    together is global positions [j * B * world_size, (j + 1) * B * world_size), so an optimiser step of
    grad_accum micro-batches reads the permutation's next batch_size x world_size x grad_accum entries, and
    an epoch has num_images // that many steps, on any number of ranks.
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

    def global_position(self, position: int) -> int:
        """The permutation's index of this rank's `position` (the key of the sample's seed)."""
        return self.rank + self.world_size * position


class LoaderPosition:
    """epoch/step bookkeeping of a TwoViewLoader (its `shard` an EpochShard): step = batches already yielded
    in `epoch` by this rank.

    state_dict() is the position of the next batch, {"epoch", "step", "samples"}; "samples" is the global
    position (samples read by all ranks in the epoch), which load_state_dict prefers, so that a position
    recorded on one number of ranks resumes on another. After the last batch of epoch e it reads epoch e + 1,
    step 0. set_epoch(e) restarts at step 0 unless the loader already is in epoch e (so set_epoch after
    load_state_dict keeps the resumed step).
    """

    epoch: int = 0
    step: int = 0
    shard: EpochShard

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict:
        epoch, step = (self.epoch + 1, 0) if self.step >= len(self) else (self.epoch, self.step)
        return {"epoch": epoch, "step": step, "samples": step * self.shard.batch_size * self.shard.world_size}

    def load_state_dict(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if "samples" in state:
            step, partial = divmod(int(state["samples"]), self.shard.batch_size * self.shard.world_size)
            if partial:
                raise ConfigError(f"loader state samples={state['samples']} is not a whole number of batches of "
                                  f"batch_size={self.shard.batch_size} x {self.shard.world_size} ranks")
        if not 0 <= step <= len(self):
            raise ConfigError(f"loader state step={step} is outside this loader's epoch of {len(self)} steps "
                              f"(different data or batch_size than the checkpoint?)")
        self.epoch, self.step = epoch, step
