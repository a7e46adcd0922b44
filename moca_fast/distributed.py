"""Where this process stands in the process group, for code that also runs without one."""
from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(compute):
    """compute() on rank 0 only, its result (or the exception it raised) broadcast to every rank, so that
    all ranks go on with the same answer or the same error; called directly without a process group."""
    rank, world = rank_and_world()
    if world == 1:
        return compute()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = compute()
        except Exception as e:  # every rank must leave the broadcast and raise the same error
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]
