"""The processes a rank depends on, seen from inside it: the launcher that started it, the other ranks of
the run (announcements of their end in the process group's TCP store, any node), and the ranks its launcher
started on this node (their liveness, read in /proc). Used by moca_fast.ending; standard library only.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

ANNOUNCEMENT_KEY = "moca_fast/ended"
#: the variables launchers set to the number of ranks started on this node (torchrun, deepspeed)
RANKS_PER_NODE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


@dataclass
class PeerEnd:
    """Another rank ended: its rank, exit status, its line (for a stop: what stopped it), whether it printed
    that line itself, and whether it was a stop (a signal, its launcher gone) rather than an error."""

    rank: int
    status: int
    line: str
    printed: bool
    stop: bool = False
    sibling: bool = False  # a rank of this node seen gone (no announcement)


class Peers:
    """The other ranks: announcements in the process group's TCP store (any node), and the ranks started
    by this rank's launcher on this node (their liveness). Both are read only once the process group is up."""

    def __init__(self, rank: int):
        self.rank = rank
        self._store = None
        self._store_failed = False
        self._lock = threading.Lock()
        self._siblings: dict[int, int] | None = None
        self._parent = os.getppid()

    @staticmethod
    def group_size() -> int:
        """The size of the process group; 1 while there is none (or torch.distributed is still importing)."""
        dist = sys.modules.get("torch.distributed")
        try:
            return dist.get_world_size() if dist is not None and dist.is_initialized() else 1
        except Exception:  # noqa: BLE001 - read from the watcher thread while the main thread imports it
            return 1

    def _connect(self):
        """A client of our own on the store of the process group (MASTER_ADDR:MASTER_PORT), or None (also once
        rank 0, its host, is a sibling seen gone: a store operation would then only fail, noisily)."""
        if self._store_failed or self.group_size() < 2:
            return None
        if self.rank != 0 and self._rank0_gone():
            self._store, self._store_failed = None, True
            return None
        if self._store is not None:
            return self._store
        try:
            from torch.distributed import TCPStore

            self._store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=5))
        except Exception:  # noqa: BLE001 - no store (another init method): no announcements
            self._store_failed = True
        return self._store

    def announce(self, end: PeerEnd) -> None:
        with self._lock:
            store = self._connect()
            if store is None:
                return
            payload = json.dumps({"rank": end.rank, "status": end.status, "line": end.line, "printed": end.printed,
                                  "stop": end.stop})
            try:
                store.compare_set(ANNOUNCEMENT_KEY, "", payload)  # the first rank to end is the one reported
            except Exception:  # noqa: BLE001 - the store's host (rank 0) is gone
                self._store_failed = True

    def ended_peer(self) -> PeerEnd | None:
        with self._lock:
            store = self._connect()
            if store is None:
                return None
            try:
                if not store.check([ANNOUNCEMENT_KEY]):
                    return None
                info = json.loads(store.get(ANNOUNCEMENT_KEY))
            except Exception:  # noqa: BLE001 - the store's host ended: its own line says why
                self._store = None
                self._store_failed = True
                return None
        if info["rank"] == self.rank:
            return None
        return PeerEnd(info["rank"], info["status"], info["line"], info["printed"], info.get("stop", False))

    def _list_siblings(self) -> dict[int, int]:
        """{pid: rank} of the other ranks our launcher started on this node, listed once the group is up."""
        if self._siblings is None:
            if self.group_size() < 2 or not any(v in os.environ for v in RANKS_PER_NODE_VARIABLES):
                return {}
            self._siblings = {pid: _rank_of(pid) for pid in _children_of(self._parent) if pid != os.getpid()}
        return self._siblings

    def _gone(self, pid: int) -> bool:
        return _parent_of(pid) != self._parent or _state_of(pid) in ("Z", "X", None)

    def dead_sibling(self) -> tuple[int, int] | None:
        """(pid, rank) of a rank started by our launcher on this node that has ended, or None."""
        return next(((pid, rank) for pid, rank in self._list_siblings().items() if self._gone(pid)), None)

    def _rank0_gone(self) -> bool:
        return any(rank == 0 and self._gone(pid) for pid, rank in (self._siblings or {}).items())

    def lowest_alive(self, rank: int) -> bool:
        """Whether `rank` is the lowest rank still running among this node's ranks (it speaks for them)."""
        return all(other > rank for pid, other in self._list_siblings().items() if not self._gone(pid))

    def wait_for_siblings(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(not self._gone(pid) for pid in self._list_siblings()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            self._store = None
            self._store_failed = True


# ---------------------------------------------------------------------- processes (Linux /proc)
@dataclass
class Ancestor:
    """A process this rank watches: alive while it is still `child`'s parent (immune to pid reuse)."""

    pid: int
    child: int
    name: str

    def alive(self) -> bool:
        return _parent_of(self.child) == self.pid


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    try:
        return int(fields[1]) if fields else None
    except ValueError:
        return None


def _state_of(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


def _children_of(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and _parent_of(int(entry)) == parent:
            children.append(int(entry))
    return children


def _rank_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except (OSError, ValueError):
        pass
    return -1


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


def kill_children() -> None:
    """SIGKILL to this process's own children (loader workers ignore stop signals: the rank ends them)."""
    me = os.getpid()
    for pid in _children_of(me):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
