"""Worker processes for the data scan, and its progress line.

The scan decodes every new file once (about 1.5 ms of CPU per ImageNet JPEG, a fifth of it under the
GIL), so it runs in processes, one per core, not threads. The workers are forked, ignore SIGINT,
SIGTERM and SIGHUP (the parent decides what a signal means: it stops the scan and kills them), die
with their parent (PR_SET_PDEATHSIG) and are SIGKILLed when the pool closes, however the parent
leaves it (exception, interpreter exit). The parent waits on them in slices of WAKE_S seconds, so a
signal handler that raises in the parent stops the scan within that time.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import time

log = logging.getLogger("moca_fast.data")

WAKE_S = 0.5
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """This process gets SIGKILL when its parent dies (Linux; elsewhere a no-op); exits now if it already did."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's close and the pipe's EOF end the worker
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)


def _serve(conn, parent_pid: int) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(parent_pid)
    while True:
        try:
            fn, arg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            reply = (True, fn(arg))
        except Exception as e:  # sent back and raised in the parent
            reply = (False, e)
        conn.send(reply)


def _kill(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join()


class WorkerPool:
    """`processes` forked workers; map_unordered runs fn(task) for each task and yields (task, result)."""

    def __init__(self, processes: int):
        ctx = mp.get_context("fork")
        self.processes, self.conns = [], []
        for _ in range(processes):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child_end, os.getpid()), daemon=True, name="moca_fast-scan")
            p.start()
            child_end.close()
            self.processes.append(p)
            self.conns.append(parent_end)
        # runs before multiprocessing's exit handler, which would SIGTERM (ignored) and wait on them
        self._finalizer = multiprocessing.util.Finalize(self, _kill, args=(list(self.processes),), exitpriority=100)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()
        for conn in self.conns:
            conn.close()

    def map_unordered(self, fn, tasks):
        tasks = iter(tasks)
        busy: dict = {}

        def give(conn) -> None:
            task = next(tasks, None)
            if task is not None:
                conn.send((fn, task))
                busy[conn] = task

        for conn in self.conns:
            give(conn)
        sentinels = {p.sentinel: p for p in self.processes}
        while busy:
            for ready in multiprocessing.connection.wait(list(busy) + list(sentinels), timeout=WAKE_S):
                if ready in sentinels:
                    p = sentinels[ready]
                    p.join(5)
                    raise RuntimeError(f"a scan worker process (pid {p.pid}) died with exit code {p.exitcode}")
                ok, payload = ready.recv()
                task = busy.pop(ready)
                if not ok:
                    raise payload
                give(ready)
                yield task, payload


def map_inline(fn, tasks):
    """map_unordered without processes (small jobs)."""
    for task in tasks:
        yield task, fn(task)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Files done of a total: a tqdm bar on a terminal, else a log line every `every_s` seconds; both
    with the rate and the time left."""

    def __init__(self, total: int, what: str, unit: str = "files", every_s: float = 15.0, enabled: bool = True):
        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit[:-1] if unit.endswith("s") else unit,
                            unit_scale=True, dynamic_ncols=True, leave=False)
        self.enabled = enabled

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last_line >= self.every_s and self.done < self.total:
            self.last_line = now
            log.info("%s", self.line())

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        left = format_duration(eta) if eta != float("inf") else "unknown"
        return (f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f} %), "
                f"{rate:,.0f} {self.unit}/s, ETA {left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
