"""Stopping every rank of the training loop at the same step, with a checkpoint of it.

The stop requests themselves (SIGTERM, SIGINT, SIGHUP, the launcher gone) are received by the process-wide
handling that every entry point installs from its first line (moca_fast.ending); in the loop it runs in
deferred mode and only records them. StopSignal turns a request on any rank into the same decision on every
rank at the same step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moca_fast.ending import Ending
from moca_fast.train.engine import DistInfo


class StopSignal:
    """`agreed()` turns True on every rank at the same step once any rank had a stop request.

    The agreement is an all-reduce of a CPU tensor on a gloo group of its own, started without waiting
    after step s and read after step s+1 (a network round trip overlapped with a step, not one per step):
    all ranks read the same value at the same step, so they stop at the same step and save it.
    """

    def __init__(self, dist_info: DistInfo, ending: Ending):
        self.ending = ending
        self.group = dist.new_group(backend="gloo") if dist_info.world_size > 1 else None
        self._pending = None  # (tensor, work) of the all-reduce started after the previous step

    def agreed(self) -> bool:
        requested = self.ending.requested is not None
        if self.group is None:
            return requested
        stop = False
        if self._pending is not None:
            tensor, work = self._pending
            work.wait()
            stop = bool(tensor.item())
        if not stop:
            tensor = torch.tensor([int(requested)], dtype=torch.int32)
            self._pending = tensor, dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        else:
            self._pending = None
        return stop

    def close(self) -> None:
        """Waits for the all-reduce in flight (every rank started it: none is left waiting)."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
