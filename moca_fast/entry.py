"""The outermost handler every entry point shares (launch/train.py, python -m moca_fast.eval, python -m
moca_fast.io): from the first line of main, stops are handled (moca_fast.ending) and every error ends as one line.

- A known error (a bad setting or input, ...) raises the same way on every rank: rank 0 prints its line once.
  A rank that alone has one tells the others, and rank 0 prints it for it.
- Any other error is printed by the rank that raised it: `error: rank N: Type: message; <context> (traceback in
  FILE)`. FILE is in the run folder when that exists (error_rankN.log), else a new file in the system's
  temporary folder: a traceback never reaches the terminal.
- An error that another rank's end caused here (a collective it broke) is not reported again; an error raised
  after a stop signal ends the process as that stop does.
Only the standard library, moca_fast.ending and moca_fast.errors are imported here, so that this is what a main
starts with.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable

from moca_fast import ending
from moca_fast.errors import CheckpointError, ConfigError

EXIT_ERROR, EXIT_BAD_INPUT = 1, 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit status 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (300 characters at most), or its type's name."""
    return (str(error).strip().splitlines() or [""])[0][:300] or type(error).__name__


def positive(name: str, value, minimum=1):
    if value is not None and value < minimum:
        raise ConfigError(f"{name} {value} must be >= {minimum}")
    return value


def known_error(error: Exception) -> tuple[int, str] | None:
    """(status 2, its line) for a bad setting or input (ConfigError, CheckpointError); None for the others."""
    if isinstance(error, (ConfigError, CheckpointError)):
        return EXIT_BAD_INPUT, f"error: {first_line(error)}"
    return None


def traceback_file(folder: str | os.PathLike | None, rank: int) -> Path:
    """<folder>/error_rank<rank>.log when `folder` is an existing writable folder, else a new file in the
    system's temporary folder."""
    if folder is not None and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
        return Path(folder) / f"error_rank{rank}.log"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"moca_fast-error-{stamp}-rank{rank}-pid{os.getpid()}.log"


def unexpected_error_line(error: BaseException, folder, context: str = "") -> str:
    """`error: rank N: Type: message[; context] (traceback in FILE)`, the traceback written to FILE (on the
    console only if no file at all can be written)."""
    rank = int(os.environ.get("RANK", "0"))
    trace = "".join(traceback.format_exception(error))
    log_file = traceback_file(folder, rank)
    try:
        with open(log_file, "a") as f:
            f.write(trace)
        kept = f"traceback in {log_file}"
    except OSError:
        print(trace, file=sys.stderr)
        kept = "traceback above"
    context = f"; {context}" if context else ""
    return f"error: rank {rank}: {type(error).__name__}: {first_line(error)}{context} ({kept})"


def run_main(body: Callable[[ending.Ending], int], known: Callable[[Exception], tuple[int, str] | None],
             folder: Callable[[], str | None] = lambda: None, context: Callable[[], str] = lambda: "") -> int:
    """body(ending) with stops handled and every error one line; returns the exit status.

    known(error): (status, line) for the errors that are the same on every rank, None for the others.
    folder(): the run folder for tracebacks, when there is one. context(): what an unexpected error's line
    adds after the message (e.g. the last complete checkpoint).
    """
    with ending.installed() as end:
        try:
            return body(end)
        except Exception as error:  # noqa: BLE001 - the edge of the program: one line, never a traceback
            report = _safely(partial(known, error), None)
            if report is not None:
                end.report(*report)
                return report[0]
            end.end_as_stop_if_stopping()
            peer = end.peer_cause()
            if peer is not None:
                end.end_for_peer(peer)
            line = unexpected_error_line(error, _safely(folder, None), _safely(context, ""))
            end.report(EXIT_ERROR, line, every_rank=True)
            return EXIT_ERROR


def _safely(compute, fallback):
    """compute(), or `fallback` if it raises: what reports an error must not raise (say, the import that failed
    is needed to classify it)."""
    try:
        return compute()
    except Exception:  # noqa: BLE001
        return fallback
