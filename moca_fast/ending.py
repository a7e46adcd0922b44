"""How a moca_fast process ends: promptly and with one line, whatever ends it.

Every entry point installs this from the first line of its main (`installed()`). It covers SIGTERM, SIGINT
and SIGHUP, the end of the launcher that started the rank, and the end of another rank. What a stop does
depends on the mode the program is in:

- immediate (the default: nothing unsaved, e.g. before step 1, a resumed run before its first new step, an
  evaluation after a checkpoint): the process ends now, from a watcher thread, even while the main thread
  waits inside a collective or a data scan. Rank 0 prints one line ("stopped by SIGTERM before step 1:
  nothing to save"), the rank's child processes (loader workers) are killed with it, and the exit status is
  128 + the signal's number (129 when the launcher went away);
- deferred (the training loop, from the first step it completes: there is a step to save): the request is
  recorded; the loop agrees on it at the next step boundary (moca_fast.train.stop.StopSignal), saves the step reached and exits 0. A further
  signal is logged and does not interrupt the save: the save completes, then the run ends (kill -9 ends it
  at once and is safe, checkpoints being atomic);
- ending (the run is finishing): signals are logged.

A rank that ends early (an error, an immediate stop) announces it in the process group's TCP store; the
watchers of the other ranks then end their processes too, so that no rank waits in a collective for one that
is gone. A rank of this node that dies without a word (SIGKILL, the OOM killer) while the others are in
the training loop is seen gone by its siblings, which end with one line instead of waiting in a collective.
Only the standard library is imported here, so that installing it is the first thing a main does.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager

from moca_fast.peers import PeerEnd, Peers, kill_children, launcher_processes

log = logging.getLogger("moca_fast")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
IMMEDIATE, DEFERRED, ENDING = "immediate", "deferred", "ending"
LAUNCHER_GONE_STATUS = 128 + signal.SIGHUP  # the process that controlled the rank hung up
POLL_S = 0.5
PEER_GRACE_S = 2.0  # a peer's announced error is acted on after this, unless this rank ended by itself first
SIBLING_CONFIRM_S = 3.0  # a sibling seen gone in the loop, with no progress here for this long, is a death
LINGER_S = PEER_GRACE_S + 4 * POLL_S  # rank 0 (the store's host) outlives its siblings by up to this at its end


def stop_status(signum: int) -> int:
    """The exit status of a process stopped by `signum` with nothing to save (the shells' convention)."""
    return 128 + int(signum)


class Ending:
    """The process's stop requests and the rules that end it; see the module docstring."""

    def __init__(self, active: bool = True):
        self.rank = int(os.environ.get("RANK", "0"))
        self.mode = IMMEDIATE
        self.situation = "before step 1: nothing to save"
        self.requested: str | None = None  # the stop the training loop is asked to agree on, e.g. "SIGTERM"
        self.received: tuple[str, int] | None = None  # (what, exit status) of the first stop, in any mode
        self._describe_saved = lambda: "nothing to save"
        self._deliveries = 0
        self._serial = 0  # counts mode changes: the main thread's progress, for the sibling check
        self._lock = threading.RLock()
        self._active = active
        self._launchers = launcher_processes() if active else []
        self._peers = Peers(self.rank) if active else None
        self._peer_seen: float | None = None
        self._stopping = False
        self._watch_errors: set[str] = set()
        self._sibling_seen: tuple[tuple[int, int], int, float] | None = None

    # ------------------------------------------------------------------ modes (set by the main thread)
    def immediate(self, situation: str) -> None:
        """Nothing unsaved from here: a stop ends the process at once, with the line "stopped by SIGTERM
        <situation>"."""
        with self._lock:
            self.mode, self.situation, self._serial = IMMEDIATE, situation, self._serial + 1
            if self.received is not None and self._active:  # it came while the mode was changing
                self._end_now(self.received[1], self._stop_line(self.received[0]), stop=self.received[0])

    def deferred(self, describe_saved) -> None:
        """The training loop: a stop is recorded and agreed at a step boundary. `describe_saved()` says which
        checkpoint is complete, for the line of a rank that has to end without saving (a peer died)."""
        with self._lock:
            self.mode, self._serial, self._describe_saved = DEFERRED, self._serial + 1, describe_saved
            if self.received is not None and self.requested is None:
                self.requested = self.received[0]

    def finishing(self) -> None:
        """The run is ending by itself: signals are only logged from here."""
        with self._lock:
            self.mode, self._serial = ENDING, self._serial + 1

    def _stop_line(self, what: str) -> str:
        if self.mode == DEFERRED:
            return f"stopped by {what} before the step reached could be saved; {self._describe_saved()}"
        return f"stopped by {what} {self.situation}"

    # ------------------------------------------------------------------ install / uninstall
    def start(self) -> None:
        if not self._active:
            return
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous = {s: signal.signal(s, self._on_signal_in_main_thread) for s in STOP_SIGNALS}
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        _register_fork_reset()
        self._thread = threading.Thread(target=self._watch, name="moca_fast-ending", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self._active:
            return
        self.finishing()
        self._linger()
        signal.set_wakeup_fd(self._previous_wakeup)
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._stopping = True
        os.write(self._write_fd, b"-")  # wakes the watcher, which returns
        self._thread.join()
        for fd in (self._read_fd, self._write_fd):
            os.close(fd)
        self._peers.close()

    # ------------------------------------------------------------------ what ends the process
    def _on_signal_in_main_thread(self, signum, frame) -> None:
        """Runs in the main thread at its next bytecode, so that the request is visible to it at once (the
        watcher thread logs and decides; this handler also keeps SIGINT from raising KeyboardInterrupt)."""
        if self.received is None:
            self.received = (signal.Signals(signum).name, stop_status(signum))
        if self.mode == DEFERRED and self.requested is None:
            self.requested = signal.Signals(signum).name

    def _watch(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._read_fd], [], [], POLL_S)
                data = os.read(self._read_fd, 512) if ready else b""
                if self._stopping:
                    return
                for signum in data:
                    if signum in STOP_SIGNALS:
                        name = signal.Signals(signum).name
                        self._stop_requested(name, stop_status(signum), f"received {name}")
                gone = next((p for p in self._launchers if not p.alive()), None)
                if gone is not None:
                    self._launchers = []
                    self._stop_requested(f"the end of the launcher {gone.name} (pid {gone.pid})",
                                         LAUNCHER_GONE_STATUS, f"the launcher {gone.name} (pid {gone.pid}) is gone")
                self._check_peers()
            except Exception as e:  # noqa: BLE001 - the watcher must outlive a bad tick
                if str(e) not in self._watch_errors:  # once each, not every tick
                    self._watch_errors.add(str(e))
                    log.warning("stop watcher: %s: %s", type(e).__name__, e)
                time.sleep(POLL_S)

    def _stop_requested(self, what: str, status: int, event: str) -> None:
        with self._lock:
            if self.received is None:
                self.received = (what, status)
            if self.mode == IMMEDIATE:
                self._end_now(status, self._stop_line(what), stop=what)
            self._deliveries += 1
            if self.mode == ENDING:
                log.warning("%s: the run is already ending", event)
            elif self._deliveries == 1:
                self.requested = self.requested or what
                log.warning("%s: saving a checkpoint and stopping", event)
            else:
                log.warning("%s again: the checkpoint of the step reached is written first, then the run ends "
                            "(kill -9 ends it now; the last complete checkpoint stays complete)", event)

    def _check_peers(self) -> None:
        if self.mode == ENDING:
            return
        now = time.monotonic()
        peer = self._peers.ended_peer()
        if peer is None:
            self._peer_seen = None
        elif self._peer_seen is None and not peer.stop:
            self._peer_seen = now
        elif peer.stop or now - self._peer_seen >= PEER_GRACE_S:  # an error: this rank may end by itself first
            with self._lock:
                if self.mode != ENDING:
                    self.end_for_peer(peer)
        dead = self._peers.dead_sibling()  # read in every mode: the siblings are listed while all are alive
        if dead is None or self.mode != DEFERRED:
            self._sibling_seen = None
        elif self._sibling_seen is None or self._sibling_seen[:2] != (dead, self._serial):
            self._sibling_seen = (dead, self._serial, now)
        elif now - self._sibling_seen[2] >= SIBLING_CONFIRM_S:
            with self._lock:
                if self.mode == DEFERRED and self._serial == self._sibling_seen[1]:
                    self._end_now(1, self.sibling_line(dead), print_here=self._peers.lowest_alive(self.rank))

    def end_for_peer(self, peer: PeerEnd) -> None:
        """Ends this process as `peer` ended: a stop with its stop line (rank 0), an error silently or, if the
        peer could not print it, with its line (rank 0). Never returns."""
        if peer.stop:
            self._end_now(peer.status, self._stop_line(f"{peer.line} on rank {peer.rank}"), announce=False)
        self._end_now(peer.status, None if peer.printed else peer.line, announce=False,
                      print_here=self.rank == 0 or peer.sibling and self._peers.lowest_alive(self.rank))

    def sibling_line(self, dead: tuple[int, int]) -> str:
        pid, rank = dead
        return (f"error: rank {self.rank}: rank {rank} (pid {pid}) of this node ended without a word (killed?) "
                f"during the training loop; {self._describe_saved()}")

    def _end_now(self, status: int, line: str | None, stop: str | None = None, announce: bool = True,
                 print_here: bool | None = None) -> None:
        """Ends the process from any thread: `line` is printed (by rank 0 unless print_here says otherwise), the
        other ranks are told (`stop`: what stopped it), this rank's children are killed. Never returns."""
        with self._lock:
            self.mode = ENDING
            printed = line is not None and (self.rank == 0 if print_here is None else print_here)
            if printed:
                _write_line(line)
            if announce:
                self._peers.announce(PeerEnd(self.rank, status, stop or line or "", printed=printed or not line,
                                             stop=stop is not None))
            self._linger()
            kill_children()
            _remove_unfinished_files()
            os._exit(status)

    def _linger(self) -> None:
        """Rank 0 hosts the process group's store: it waits (up to LINGER_S) for the ranks of its node to end
        first, so that they can still read and write their announcements."""
        if self.rank == 0 and self._peers is not None:
            self._peers.wait_for_siblings(LINGER_S)

    # ------------------------------------------------------------------ for the outermost error handler
    def end_as_stop_if_stopping(self) -> None:
        """An error raised after a stop signal (a collective it broke, a child it ended) is part of that stop:
        ends the process as the stop does (and does not return then)."""
        if self.received is not None and self._active:
            with self._lock:
                self._end_now(self.received[1], self._stop_line(self.received[0]), stop=self.received[0])

    def report(self, status: int, line: str, every_rank: bool = False) -> None:
        """This rank ends with `status`: `line` is printed (by rank 0 only, unless every_rank) and the other
        ranks are told; the caller then returns `status` from main."""
        with self._lock:
            self.mode = ENDING
            printed = every_rank or self.rank == 0
            if printed:
                _write_line(line)
            if self._peers is not None:
                self._peers.announce(PeerEnd(self.rank, status, line, printed=printed))

    def peer_cause(self, wait: float = PEER_GRACE_S) -> PeerEnd | None:
        """The end of another rank that explains an error here (announced, or a sibling gone), waiting up to
        `wait` seconds for its announcement; None without one (or without other ranks)."""
        if self._peers is None or self._peers.group_size() < 2:
            return None
        deadline = time.monotonic() + wait
        while (peer := self._peers.ended_peer()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if peer is not None:
            return peer
        dead = self._peers.dead_sibling()
        return PeerEnd(dead[1], 1, self.sibling_line(dead), printed=False, sibling=True) if dead is not None else None


def _write_line(line: str) -> None:
    try:
        sys.stdout.flush()
        print(line.rstrip("\n"), file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed or broken stream: the exit status still says it
        pass


# ---------------------------------------------------------------------- files being written
_unfinished: set[str] = set()


@contextmanager
def unfinished_file(path: str | os.PathLike):
    """While the block runs, `path` (the temporary file of an atomic write) is removed if the process ends at
    once (an immediate stop, a peer's end): no temporary file is left behind by a stop at any moment."""
    _unfinished.add(os.fspath(path))
    try:
        yield
    finally:
        _unfinished.discard(os.fspath(path))


def _remove_unfinished_files() -> None:
    for path in list(_unfinished):
        try:
            os.unlink(path)
        except OSError:  # already renamed into place, or never created
            pass


# ---------------------------------------------------------------------- the process-wide instance
_current: Ending | None = None
_fork_reset_registered = False


def _reset_in_child() -> None:
    """A forked child (a loader worker) keeps neither our wakeup pipe nor our handlers."""
    global _current
    if _current is not None and _current._active:
        signal.set_wakeup_fd(-1)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        for fd in (_current._read_fd, _current._write_fd):
            os.close(fd)
    _current = None


def _register_fork_reset() -> None:
    global _fork_reset_registered
    if not _fork_reset_registered:
        os.register_at_fork(after_in_child=_reset_in_child)
        _fork_reset_registered = True


def current() -> Ending | None:
    return _current


@contextmanager
def installed():
    """Stop handling for the duration of the block; re-entrant (an inner block uses the outer one). Outside
    the main thread (where signal handlers cannot be set) it tracks the modes and never ends the process."""
    global _current
    if _current is not None:
        yield _current
        return
    ending = Ending(active=threading.current_thread() is threading.main_thread())
    ending.start()
    _current = ending
    try:
        yield ending
    finally:
        _current = None
        ending.stop()
