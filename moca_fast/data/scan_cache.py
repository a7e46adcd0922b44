"""The scan's verdicts on disk: one journal file per class folder, appended to as the scan goes.

Layout: <data>/.moca_fast_scan/<sha1 of the class folder name>.jsonl, or, when the data folder is not
writable, <cache root>/scans/<sha1 of the data folder>/... . The first line of a journal is a header
({"format", "pixel_limit", "group"}); each further line is a JSON list of [path relative to the data
folder, size, mtime_ns, verdict] for one chunk of checked files, written in one append as soon as the
chunk is checked, so an interrupted scan keeps everything it checked. A later line wins over an
earlier one for the same path; a torn last line (a kill mid-write) is ignored. A journal whose header
does not match (older format, other pixel limit) counts as empty. A journal holding stale entries
(files removed or changed since) is rewritten compactly at the end of the scan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("moca_fast.data")

CACHE_DIR_NAME = ".moca_fast_scan"
CACHE_FORMAT = 2


def group_file_name(group: str) -> str:
    return hashlib.sha1(os.fsencode(group)).hexdigest()[:20] + ".jsonl"


def _candidates(root: str, user_cache: Path) -> list[Path]:
    digest = hashlib.sha1(os.fsencode(root)).hexdigest()[:16]
    return [Path(root) / CACHE_DIR_NAME, user_cache / "scans" / digest]


def choose_cache_dir(root: str, user_cache: Path) -> Path | None:
    """The journal folder of `root`: the first candidate that exists, else the first that can be created
    and written; None when none can (the scan then keeps nothing)."""
    candidates = _candidates(root, user_cache)
    for folder in candidates:
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
            return folder
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return folder
        except OSError:
            continue
    return None


def header(pixel_limit, group: str) -> dict:
    return {"format": CACHE_FORMAT, "pixel_limit": pixel_limit, "group": group}


def read_journal(path: Path | None, expected: dict) -> tuple[dict[str, tuple[int, int, str]], bool]:
    """({relative path: (size, mtime_ns, verdict)}, whether the file must be rewritten before appending:
    a torn last line or a header that does not match)."""
    if path is None:
        return {}, False
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}, False
    lines = data.split(b"\n")
    torn = bool(lines[-1])  # a complete file ends with a newline
    try:
        if json.loads(lines[0]) != expected:
            return {}, True
    except ValueError:
        return {}, True
    entries = {}
    for line in lines[1:-1] if not torn else lines[1:]:
        if not line:
            continue
        try:
            chunk = json.loads(line)
        except ValueError:
            torn = True
            continue
        for rel, size, mtime, verdict in chunk:
            entries[rel] = (size, mtime, verdict)
    return entries, torn


class Journal:
    """Appends checked chunks to the journals of one scan (see the module docstring)."""

    def __init__(self, folder: Path | None, pixel_limit):
        self.folder, self.pixel_limit = folder, pixel_limit
        self.failed = False

    def path(self, group: str) -> Path | None:
        return None if self.folder is None else self.folder / group_file_name(group)

    def header(self, group: str) -> dict:
        return header(self.pixel_limit, group)

    def append(self, group: str, entries: list) -> None:
        path = self.path(group)
        if path is None or self.failed:
            return
        try:
            if not path.exists():
                self._write(path, group, [])
            with open(path, "ab") as f:
                f.write(self._line(entries))
        except OSError as e:
            self._warn(e)

    def rewrite(self, group: str, entries: list) -> None:
        """Replaces the journal of `group` (atomically) by one holding exactly `entries`."""
        path = self.path(group)
        if path is None or self.failed:
            return
        try:
            self._write(path, group, entries)
        except OSError as e:
            self._warn(e)

    def _line(self, entries: list) -> bytes:
        return json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"

    def _write(self, path: Path, group: str, entries: list) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(self.header(group)).encode() + b"\n")
                for lo in range(0, len(entries), 4096):
                    f.write(self._line(entries[lo:lo + 4096]))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _warn(self, error: OSError) -> None:
        self.failed = True
        log.warning("could not write the scan cache in %s (%s); the next scan checks these files again",
                    self.folder, error.strerror or error)
