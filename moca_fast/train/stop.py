"""Stopping every rank at the same step, with a checkpoint, on SIGTERM / SIGINT or when the launcher
that started the ranks goes away (see StopSignal)."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moca_fast.train.cpu_threads import RANKS_PER_NODE_VARIABLES
from moca_fast.train.engine import DistInfo

log = logging.getLogger("moca_fast.train")


class StopSignal:
    """SIGTERM / SIGINT, or the launcher that started this rank going away, set a flag; `agreed()` turns
    True on every rank at the same step once any rank had it.

    The agreement is an all-reduce of a CPU tensor on a gloo group of its own, started without waiting
    after step s and read after step s+1 (a network round trip overlapped with a step, not one per step):
    all ranks read the same value at the same step, so they stop at the same step and save it.
    Repeated SIGTERMs are ignored: a launcher forwards the one its process group got, and the rank must
    live to save. A second SIGINT restores the default handler (a second Ctrl-C kills).
    """

    def __init__(self, dist_info: DistInfo):
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.group = dist.new_group(backend="gloo") if dist_info.world_size > 1 else None
        self._pending = None  # (tensor, work) of the all-reduce started after the previous step
        self._launchers = launcher_processes()
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.flag.item():
            log.warning("received %s again: already saving a checkpoint and stopping", name)
        else:
            log.warning("received %s: saving a checkpoint and stopping", name)
        self.flag.fill_(1)
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    def _check_launchers(self) -> None:
        gone = next((p for p in self._launchers if not p.alive()), None)
        if gone is not None:
            log.warning("the launcher %s (pid %d) is gone: saving a checkpoint and stopping", gone.name, gone.pid)
            self.flag.fill_(1)
            self._launchers = []

    def agreed(self) -> bool:
        self._check_launchers()
        if self.group is None:
            return bool(self.flag.item())
        stop = False
        if self._pending is not None:
            tensor, work = self._pending
            work.wait()
            stop = bool(tensor.item())
        if not stop:
            tensor = self.flag.clone()
            self._pending = tensor, dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        else:
            self._pending = None
        return stop

    def restore(self) -> None:
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Ancestor:
    """A process this rank watches: alive while it is still `child`'s parent (immune to pid reuse)."""

    pid: int
    child: int
    name: str

    def alive(self) -> bool:
        return _parent_of(self.child) == self.pid


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def launcher_processes() -> list[Ancestor]:
    """The launcher processes above this rank: its parent under a launcher (torchrun, deepspeed's
    launch.py), and for deepspeed also the `deepspeed` command above launch.py, which dies alone on a
    SIGTERM of its own and would leave the ranks training. None for a plain `python launch/train.py`."""
    if not any(v in os.environ for v in RANKS_PER_NODE_VARIABLES) or not os.path.isdir("/proc"):
        return []
    me, parent = os.getpid(), os.getppid()
    out = [Ancestor(parent, me, "process")]
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            parent_command = f.read()
    except OSError:
        return out
    grandparent = _parent_of(parent)
    if b"deepspeed.launcher.launch" in parent_command and grandparent not in (None, 0, 1):
        out = [Ancestor(parent, me, "deepspeed.launcher.launch"), Ancestor(grandparent, parent, "deepspeed")]
    return out
