"""SIGINT / SIGTERM / SIGHUP during a viz command: the command ends with one line, no traceback, no partial file.

Imports nothing heavy, so `python -m moca_fast.viz` installs the handlers before torch and matplotlib load.
The handlers record the signal and raise `Interrupted` (a BaseException, so no `except Exception` swallows it);
the figure writer removes its temporary file on the way out (see moca_fast.viz.figure.save_png).
Python drops an exception raised inside an at-fork or __del__ callback (a DataLoader starting its workers) and
prints it as "Exception ignored in ...": while the handlers are installed, such reports of our own Interrupted,
and of objects that fail in __del__ because the signal cut their construction short, are not printed; the
recorded signal still stops the command at its next `check` (before any file is written).
"""
from __future__ import annotations

import gc
import signal
import sys

from moca_fast.ending import STOP_SIGNALS

_received: list[int] = []


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by this signal"


def _raise(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raises Interrupted if a stop signal came since `install` (its own exception may have been dropped)."""
    if _received:
        raise Interrupted(_received[0])


def install() -> dict:
    """Handlers that raise Interrupted, and the filter of dropped-exception reports; returns what they replace
    (for `restore`)."""
    previous = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    previous["unraisablehook"] = sys.unraisablehook

    def unless_stopping(unraisable) -> None:
        if not (_received or issubclass(unraisable.exc_type, Interrupted)):
            previous["unraisablehook"](unraisable)

    sys.unraisablehook = unless_stopping
    return previous


def restore(previous: dict) -> None:
    """What `install` replaced; after a signal, first collects the objects it cut short (quietly)."""
    if _received:
        gc.collect()
    sys.unraisablehook = previous.pop("unraisablehook")
    for s, handler in previous.items():
        signal.signal(s, handler)
    _received.clear()
