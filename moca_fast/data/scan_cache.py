"""The scan's verdicts on disk: one journal file per class folder, appended to as the scan goes.

Nothing is ever written into the data folder. Layout: <scans>/<sha1 of the data folder's real path>/<sha1 of the
class folder name>.jsonl, where <scans> is the folder the user names (the scan_cache setting, `--scan-cache`, or
$MOCA_FAST_SCAN_CACHE), else <cache root>/scans (see cache_root). A multi-node run finds the journals where rank 0
put them when <scans> is shared, and scans again otherwise. A `.moca_fast_scan/` folder that older versions kept
inside the data folder is used once: its journals are copied to the cache and the folder removed (left in place
when the data folder is not writable), and the log says so.

The first line of a journal is a header ({"format", "pixel_limit", "group"}); each further line is a JSON list of
[path relative to the data folder, size, mtime_ns, verdict] for one chunk of checked files, written in one append
as soon as the chunk is checked, so an interrupted scan keeps everything it checked. A later line wins over an
earlier one for the same path; a damaged line (torn by a kill mid-write, not UTF-8, not JSON, or JSON of another
shape) is skipped, counted and logged, and the journal rewritten. A journal whose header does not match (older
format, other pixel limit) counts as empty. A journal holding stale entries (files removed or changed since) is
rewritten compactly at the end of the scan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from moca_fast.records import BadRecord, check_int, check_list, check_str, parse_json, read_json_lines

log = logging.getLogger("moca_fast.data")

#: where versions before 2026-12 kept the journals: a hidden folder inside the data folder
LEGACY_DIR_NAME = ".moca_fast_scan"
SCAN_CACHE_ENV = "MOCA_FAST_SCAN_CACHE"
CACHE_FORMAT = 2
#: the verdicts kept in the journals: usable (by DALI, or by PIL only), not an image, "bad:" + why
OK, OK_PIL, NOT_IMAGE, BAD = "ok", "ok:pil", "skip", "bad:"


def cache_root() -> Path:
    """moca_fast's cache folder: $MOCA_FAST_CACHE, else $XDG_CACHE_HOME/moca_fast, else ~/.cache/moca_fast."""
    if os.environ.get("MOCA_FAST_CACHE"):
        return Path(os.environ["MOCA_FAST_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "moca_fast"
    return Path.home() / ".cache" / "moca_fast"


def scans_folder(named: str | os.PathLike | None = None) -> Path:
    """The folder holding the journals of every data folder: `named` (the scan_cache setting), else
    $MOCA_FAST_SCAN_CACHE, else <cache root>/scans."""
    if named:
        return Path(named).expanduser()
    env = os.environ.get(SCAN_CACHE_ENV)
    return Path(env).expanduser() if env else cache_root() / "scans"


def journal_folder(root: str | os.PathLike, scans: Path) -> Path:
    """The journal folder of data folder `root` under `scans`: keyed by the real path of `root`."""
    real = os.path.realpath(os.path.expanduser(os.fspath(root)))
    return scans / hashlib.sha1(os.fsencode(real)).hexdigest()[:16]


def group_file_name(group: str) -> str:
    return hashlib.sha1(os.fsencode(group)).hexdigest()[:20] + ".jsonl"


def choose_cache_dir(root: str, scans: Path) -> Path | None:
    """The journal folder of `root`, created and probed for writing, with the journals an older version left
    in `root` adopted; None when it cannot be written (the scan then keeps nothing)."""
    folder = journal_folder(root, scans)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        log.warning("cannot write the scan cache folder %s (%s)", folder, e.strerror or e)
        return None
    adopt_legacy_journals(Path(root), folder)
    return folder


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def adopt_legacy_journals(root: Path, folder: Path) -> None:
    """Copies the journals of <root>/.moca_fast_scan (older versions) into `folder` (a journal already there
    wins), then removes <root>/.moca_fast_scan when `root` is writable; logs what it did."""
    legacy = root / LEGACY_DIR_NAME
    if not legacy.is_dir():
        return
    copied = 0
    try:
        for path in sorted(legacy.glob("*.jsonl")):
            target = folder / path.name
            if path.is_file() and not target.exists():
                tmp = folder / f".{path.name}.{os.getpid()}.tmp"
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
                copied += 1
    except OSError as e:
        log.warning("could not read the scan cache an older version left in %s (%s); its files are checked again",
                    legacy, e.strerror or e)
        return
    if not _writable(root):
        if copied:
            log.info("read the scan cache an older version left in %s into %s (%d journals); it stays there: "
                     "the data folder is not writable", legacy, folder, copied)
        return
    try:
        shutil.rmtree(legacy)
    except OSError as e:
        log.warning("copied the scan cache an older version left in %s to %s, but could not remove it (%s)",
                    legacy, folder, e.strerror or e)
        return
    log.info("moved the scan cache an older version left in %s to %s (%d journals)", legacy, folder, copied)


def header(pixel_limit, group: str) -> dict:
    return {"format": CACHE_FORMAT, "pixel_limit": pixel_limit, "group": group}


def _chunk(value) -> list[tuple[str, int, int, str]]:
    """The entries of one journal line: [[relative path, size, mtime_ns, verdict], ...]."""
    entries = []
    for entry in check_list(value, "the line"):
        rel, size, mtime, verdict = check_list(entry, "an entry", 4)
        if not (verdict in (OK, OK_PIL, NOT_IMAGE) or isinstance(verdict, str) and verdict.startswith(BAD)):
            raise BadRecord(f"{str(verdict)[:40]!r} is not a verdict")
        entries.append((check_str(rel, "a path"), check_int(size, "a size"), check_int(mtime, "an mtime"), verdict))
    return entries


def read_journal(path: Path | None, expected: dict) -> tuple[dict[str, tuple[int, int, str]], bool]:
    """({relative path: (size, mtime_ns, verdict)}, whether the file must be rewritten before appending:
    a torn last line, a damaged line (skipped, counted and logged) or a header that does not match)."""
    if path is None:
        return {}, False
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}, False
    head, _, rest = data.partition(b"\n")
    try:
        if parse_json(head) != expected:
            return {}, True
    except BadRecord:
        return {}, True
    torn = not data.endswith(b"\n")  # a complete file ends with a newline
    chunks, skipped = read_json_lines(rest, path, _chunk, first_line=2)
    skipped.log(log, "journal lines")
    entries = {}
    for chunk in chunks:
        for rel, size, mtime, verdict in chunk:
            entries[rel] = (size, mtime, verdict)
    return entries, torn or bool(skipped.count)


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
