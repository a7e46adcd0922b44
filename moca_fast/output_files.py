"""What a command writes: checked before any work starts, and written so that nothing half-written is left.

Every entry point (train, eval, io) checks its output files and folders up front with a real probe write
(a read-only filesystem, missing permissions, a path component that is a file: one ConfigError line naming
the flag), and writes each result file through `atomic_file` (a temporary file beside it, renamed into place;
removed if the write fails).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from moca_fast.ending import unfinished_file
from moca_fast.errors import ConfigError


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in `folder` (or in it once its missing parents are made), or None."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        handle, probe = tempfile.mkstemp(prefix=".write_probe_", dir=existing)
    except OSError as e:
        return f"{existing}: {e.strerror or e}"
    os.close(handle)
    os.unlink(probe)
    return None


def _refusal(what: str, problem: str) -> ConfigError:
    return ConfigError(f"{what} cannot be {'created' if problem.endswith(' is a file') else 'written'}: {problem}")


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """ConfigError naming `flag` unless `path` can be written as a file (missing parent folders are made when
    it is written)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, not a file")
    problem = folder_problem(path.parent)
    if problem is not None:
        raise _refusal(f"{flag} {path}", problem)
    return path


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """ConfigError starting with `what` (e.g. "output=runs/a") unless `path` is a folder files can be written
    in, or can be created as one."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} is an existing file, not a folder")
    problem = folder_problem(path)
    if problem is not None:
        raise _refusal(what, problem)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a temporary path beside `path` to write; when the block ends without error it is flushed to
    disk and renamed onto `path`, otherwise removed (the error goes on), and so it is when the process ends
    at once meanwhile (moca_fast.ending.unfinished_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with unfinished_file(tmp):
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """A file's data, or a folder's entries (a rename into it made durable), flushed to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
