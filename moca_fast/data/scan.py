"""Finds the images of a folder, checks that each one decodes, and keeps the verdicts.

Layout: class sub-folders (ImageNet style, images found recursively inside each class folder;
label = index of the folder name in sorted order) or a flat folder of images (one class).
A file is a candidate if its extension is an image extension (case-insensitive) or its first
bytes are a JPEG/PNG/BMP/WEBP signature. Every candidate is really decoded once (JPEGs cheaply,
at 1/8 scale through PIL's draft mode, which still parses the whole bitstream so truncation is
caught); an image of more pixels than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is
skipped as too large. Each folder is walked once (by device and inode: a symlink loop ends, a
`self -> .` link adds nothing) and each file is used once; every entry not used is counted and named
in the log: bad images in `skipped`, the rest (non-images, hidden, second links, loops, files beside
class folders) in `ignored`. Names are logged with control characters escaped (one line per entry).

Scale: the class folders are listed in parallel and the files checked in parallel, in worker
processes (moca_fast.data.scan_pool: one per core by default, no GIL ceiling). Verdicts are kept in
journals (moca_fast.data.scan_cache) keyed on each file's size and mtime and appended chunk by chunk,
so an interrupted scan resumes where it stopped and a re-scan decodes only new or changed files.
`python -m moca_fast.data scan DIR` runs the scan ahead of training; the trainer reuses its journals.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from moca_fast.cpu_threads import usable_cores
from moca_fast.data.image_list import ImageList, concat_tables
from moca_fast.data.scan_cache import Journal, choose_cache_dir
from moca_fast.data.scan_pool import Progress, WorkerPool, format_duration, map_inline
from moca_fast.data.scan_walk import GroupListing, Walk, list_group, listing_of
from moca_fast.errors import ConfigError

log = logging.getLogger("moca_fast.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_IMAGE_SIDE = 2
LISTED_BAD_FILES = 20
CHECK_CHUNK = 256  # files per task (and per journal line): at ~1.5 ms a file, well under a second
MIN_FILES_PER_PROCESS = 64  # fewer files to check than this per process: checked in this process

# verdicts (as kept in the journals) and their codes in memory
_OK, _OK_PIL, _NOT_IMAGE, _BAD = "ok", "ok:pil", "skip", "bad:"
_CODE_OK, _CODE_PIL, _CODE_NOT_IMAGE, _CODE_BAD, _CODE_DUPLICATE = 0, 1, 2, 3, 4
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
#: formats DALI decodes (JPEG, PNG, BMP, TIFF; WebP by has_signature): others are read from PNG copies
DALI_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def printable(text: str) -> str:
    """`text` with control characters, line separators and undecodable bytes escaped (\\n, \\x1b, ...),
    so that a file name always stays on its log line."""
    def escape(match: re.Match) -> str:
        char = match.group()
        if "\udc80" <= char <= "\udcff":
            return f"\\x{ord(char) - 0xDC00:02x}"
        return repr(char)[1:-1]

    return _UNPRINTABLE.sub(escape, str(text))


def cache_root() -> Path:
    """moca_fast's cache folder: $MOCA_FAST_CACHE, else ~/.cache/moca_fast."""
    env = os.environ.get("MOCA_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moca_fast"


def open_rgb(path: str) -> Image.Image:
    """Decodes an image file fully into an 8-bit RGB PIL image [H, W, 3]."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # 16-bit PNGs: PIL's convert would clip them at 255
        high_byte = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
        img = Image.fromarray(high_byte, "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def pixel_limit() -> int | None:
    """Images of more pixels are skipped: PIL's decompression-bomb threshold, Image.MAX_IMAGE_PIXELS
    (89.5 M by default; None: no limit). A program may change it before scanning."""
    return Image.MAX_IMAGE_PIXELS


def inspect_image(path: str) -> tuple[str | None, bytes]:
    """Decodes one file cheaply: (None when usable, else a one-line reason; the file's first 12 bytes)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e.strerror})", b""
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            return "empty file (0 bytes)", b""
        head = f.read(12)
        f.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
            width, height = img.size
            if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
                return f"too small: {width}x{height} pixels (need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})", head
            limit = pixel_limit()
            if limit and width * height > limit:
                return (f"too large: {width}x{height} pixels, more than the limit of {limit:,} "
                        f"(PIL's decompression-bomb threshold, PIL.Image.MAX_IMAGE_PIXELS)"), head
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))
            img.load()
            to_rgb(img)
        except Image.DecompressionBombError as e:
            return f"too large ({_one_line(e)})", head
        except Image.UnidentifiedImageError:
            return "not an image PIL can decode", head
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on corrupt data
            return f"corrupt or truncated ({type(e).__name__}: {_one_line(e)})", head
    return None, head


def check_image(path: str) -> str | None:
    """None when the file is a usable image, else a one-line reason (see inspect_image)."""
    return inspect_image(path)[0]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "no detail"


def file_head(path: str) -> bytes | None:
    """The first 12 bytes of a file (enough for its format signature), or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(12)
    except OSError:
        return None


def has_signature(head: bytes, signatures: tuple[bytes, ...]) -> bool:
    """Whether `head` starts with one of `signatures`, or is a WebP (RIFF....WEBP) header."""
    return head.startswith(signatures) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _has_image_signature(path: str) -> bool:
    head = file_head(path)
    return head is not None and has_signature(head, _SIGNATURES)


def _verdict(path: str, size: int) -> str:
    if size < 0:
        return _BAD + "unreadable (cannot stat: broken link or no permission)"
    if not path.lower().endswith(IMAGE_EXTENSIONS) and not _has_image_signature(path):
        return _NOT_IMAGE
    reason, head = inspect_image(path)
    if reason is not None:
        return _BAD + reason
    return _OK if has_signature(head, DALI_SIGNATURES) else _OK_PIL


def _check_chunk(task) -> list[str]:
    """Verdicts of one chunk (root, group index, relative paths, sizes, positions): a task of the checking phase."""
    root, _, rels, sizes, _ = task
    return [_verdict(os.path.join(root, rel), size) for rel, size in zip(rels, sizes)]


def _code(verdict: str) -> int:
    if verdict == _OK:
        return _CODE_OK
    if verdict == _OK_PIL:
        return _CODE_PIL
    return _CODE_NOT_IMAGE if verdict == _NOT_IMAGE else _CODE_BAD


def _default_processes() -> int:
    return usable_cores()


class _Scan:
    """One scan of `root`: list the groups (class folders, or the root), check what the journals do not
    know, merge into an ImageList. Work runs in a WorkerPool when it is worth starting one."""

    def __init__(self, root: str, processes: int | None, progress: bool):
        self.root = root
        self.processes = max(1, processes if processes is not None else _default_processes())
        self.progress = progress
        self.pool: WorkerPool | None = None
        self.journal = Journal(choose_cache_dir(root, cache_root()), pixel_limit())
        if self.journal.folder is None:
            log.warning("no writable place for the scan cache of %s; the next scan checks every file again",
                        printable(root))
        self.stats = {"processes": self.processes, "cache": str(self.journal.folder), "listed": 0, "cached": 0,
                      "checked": 0, "list_s": 0.0, "check_s": 0.0}

    def run(self, fn, tasks: list, workers_wanted: int):
        """(task, fn(task)) for each task, in a pool when more than one worker is wanted."""
        if min(workers_wanted, self.processes) <= 1 or len(tasks) <= 1:
            return map_inline(fn, tasks)
        if self.pool is None:
            self.pool = WorkerPool(self.processes)
        return self.pool.map_unordered(fn, tasks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # ---------------------------------------------------------------- listing
    def list_groups(self, groups: list[str], entered: set) -> list[GroupListing]:
        started = time.monotonic()
        journal = self.journal
        tasks = [(self.root, g, entered, journal.path(g), journal.header(g)) for g in groups]
        progress = Progress(len(groups), f"listing {printable(self.root)}", "folders",
                            enabled=self.progress and len(groups) > 1)
        found = {}
        try:
            for task, listing in self.run(list_group, tasks, len(groups)):
                found[task[1]] = listing
                progress.update(1)
        finally:
            progress.close()
        listings = [found[g] for g in groups]
        entered_twice = Counter(k for listing in listings for k in listing.folders)
        if any(n > 1 for n in entered_twice.values()):  # two class folders reach one folder: walk in order
            walk = Walk(entered)
            listings = [listing_of(walk, self.root, g, journal.path(g), journal.header(g)) for g in groups]
        self.stats["listed"] = sum(len(listing.rels) for listing in listings)
        self.stats["cached"] = sum(listing.cached for listing in listings)
        self.stats["list_s"] = time.monotonic() - started
        return listings

    # ---------------------------------------------------------------- checking
    def check(self, listings: list[GroupListing]) -> None:
        """Fills every missing verdict, appending each checked chunk to its group's journal."""
        for listing in listings:
            if listing.needs_rewrite:  # a torn or outdated journal: rewritten before anything is appended
                self.journal.rewrite(listing.group, self._entries(listing))
                listing.needs_rewrite = False
        tasks = []
        for index, listing in enumerate(listings):
            todo = [i for i, v in enumerate(listing.verdicts) if v is None]
            for lo in range(0, len(todo), CHECK_CHUNK):
                chunk = todo[lo:lo + CHECK_CHUNK]
                tasks.append((self.root, index, [listing.rels[i] for i in chunk], [int(listing.sizes[i]) for i in chunk],
                              chunk))
        total = sum(len(t[4]) for t in tasks)
        if total:
            self._check_chunks(listings, tasks, total)
        for listing in listings:
            if listing.stale:  # entries of files removed or changed since: the journal is rewritten compactly
                self.journal.rewrite(listing.group, self._entries(listing))

    def _check_chunks(self, listings: list[GroupListing], tasks: list, total: int) -> None:
        started = time.monotonic()
        wanted = math.ceil(total / MIN_FILES_PER_PROCESS)
        log.info("checking %s new or changed files in %s with %d processes", f"{total:,}", printable(self.root),
                 min(wanted, self.processes))
        progress = Progress(total, f"scan of {printable(self.root)}", enabled=self.progress)
        try:
            for (_, index, rels, sizes, chunk), verdicts in self.run(_check_chunk, tasks, wanted):
                listing = listings[index]
                for i, verdict in zip(chunk, verdicts):
                    listing.verdicts[i] = verdict
                self.journal.append(listing.group, [[rel, size, int(listing.mtimes[i]), verdict]
                                                    for rel, size, i, verdict in zip(rels, sizes, chunk, verdicts)])
                progress.update(len(chunk))
        finally:
            progress.close()
            self.stats["checked"] = progress.done
            self.stats["check_s"] = time.monotonic() - started
        log.info("checked %s files of %s in %s (%s files/s)", f"{progress.done:,}", printable(self.root),
                 format_duration(self.stats["check_s"]), f"{progress.rate():,.0f}")

    @staticmethod
    def _entries(listing: GroupListing) -> list:
        return [[rel, int(size), int(mtime), v] for rel, size, mtime, v
                in zip(listing.rels, listing.sizes, listing.mtimes, listing.verdicts) if v is not None]


def _report_bad(root: str, skipped: list[tuple[str, str]], bad_files: str) -> None:
    if not skipped:
        return
    if bad_files == "error":
        path, reason = skipped[0]
        raise ConfigError(f"bad image file {printable(path)}: {printable(reason)} ({len(skipped)} bad in "
                          f"{printable(root)}; bad_files=skip would skip them)")
    shown = "\n  ".join(f"{printable(p)}: {printable(r)}" for p, r in skipped[:LISTED_BAD_FILES])
    more = f"\n  ... {len(skipped) - LISTED_BAD_FILES} more" if len(skipped) > LISTED_BAD_FILES else ""
    log.warning("skipping %d bad image files in %s:\n  %s%s", len(skipped), printable(root), shown, more)


def _report_ignored(root: str, ignored: list[tuple[str, str]]) -> None:
    if not ignored:
        return
    counts = Counter(reason.split(":")[0].split(" (")[0] for _, reason in ignored)
    shown = "\n  ".join(f"{printable(p)}: {printable(r)}" for p, r in ignored[:LISTED_BAD_FILES])
    more = f"\n  ... {len(ignored) - LISTED_BAD_FILES} more" if len(ignored) > LISTED_BAD_FILES else ""
    log.warning("not using %d entries of %s (%s):\n  %s%s", len(ignored), printable(root),
                ", ".join(f"{n} {reason}" for reason, n in counts.items()), shown, more)


def _duplicates_across_groups(listings: list[GroupListing]) -> dict[int, int]:
    """{position: position of the first path to the same file} over the concatenated listings (each
    group's walk already dropped its own second paths)."""
    keys = np.concatenate([listing.keys for listing in listings]) if listings else np.zeros((0, 2), np.uint64)
    known = np.flatnonzero(keys[:, 1] != 0)
    if len(known) < 2:
        return {}
    _, first, inverse = np.unique(keys[known], axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    repeated = np.flatnonzero(known[first[inverse]] != known)
    return {int(known[i]): int(known[first[inverse[i]]]) for i in repeated}


def _merge(root: str, classes: list[str], listings: list[GroupListing], ignored: list, beside: list) -> ImageList:
    rels = concat_tables([listing.rels for listing in listings])
    codes = np.array([_code(v) for listing in listings for v in listing.verdicts], dtype=np.int8)
    labels = np.repeat(np.arange(len(listings), dtype=np.int32), [len(listing.rels) for listing in listings])
    reasons = [v for listing in listings for v in listing.verdicts]
    for listing in listings:
        ignored.extend(listing.ignored)
    ignored.extend(beside)
    prefix = root if root.endswith(os.sep) else root + os.sep
    for position, first in _duplicates_across_groups(listings).items():
        codes[position] = _CODE_DUPLICATE
        ignored.append((prefix + rels[position], f"duplicate: the same file as {prefix + rels[first]}"))
    skipped = [(prefix + rels[i], reasons[i][len(_BAD):]) for i in np.flatnonzero(codes == _CODE_BAD)]
    ignored.extend((prefix + rels[i], "not an image (neither its extension nor its first bytes)")
                   for i in np.flatnonzero(codes == _CODE_NOT_IMAGE))
    usable = np.flatnonzero(codes <= _CODE_PIL)
    return ImageList(files=rels.take(usable).with_prefix(prefix), labels=labels[usable], classes=classes,
                     skipped=skipped, ignored=ignored, root=root, pil_only=np.flatnonzero(codes[usable] == _CODE_PIL))


def scan_images(root: str | os.PathLike, bad_files: str = "skip", processes: int | None = None,
                progress: bool = True, stats: dict | None = None) -> ImageList:
    """Lists and checks the images of `root` (class sub-folders or flat); see the module docstring.

    bad_files="skip" logs and skips undecodable files; "error" raises ConfigError naming the first.
    processes: worker processes (default: the usable cores; 1: all in this process). progress: a bar or
    periodic log lines while files are checked. stats, when given, receives the scan's counts and times.
    """
    if bad_files not in ("skip", "error"):
        raise ConfigError(f"bad_files={bad_files!r} must be 'skip' or 'error'")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {printable(root)} does not exist or is not a folder")
    walk = Walk()
    walk.enter(root)
    top = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e for e in top if not e.name.startswith(".") and e.is_dir() and walk.enter(e.path)]
    if class_dirs:
        classes = groups = [e.name for e in class_dirs]
        ignored = list(walk.ignored)
        beside = [(e.path, "beside the class folders") for e in top if not e.name.startswith(".") and not e.is_dir()]
    else:  # the links to root itself are found again by the listing of root
        classes, groups, ignored, beside = [os.path.basename(root)], [""], [], []
        walk = Walk()
        walk.enter(root)
    scan = _Scan(root, processes, progress)
    try:
        listings = scan.list_groups(groups, walk.folders)
        scan.check(listings)
    finally:
        scan.close()
    images = _merge(root, classes, listings, ignored, beside)
    if stats is not None:
        stats.update(scan.stats)
    _report_ignored(root, images.ignored)
    _report_bad(root, images.skipped, bad_files)
    if not len(images):
        raise ConfigError(f"data folder {printable(root)} holds no usable images (extensions: "
                          f"{', '.join(IMAGE_EXTENSIONS)}; {len(images.skipped)} bad files)")
    per_class = np.bincount(images.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, per_class) if n == 0]
    if empty:
        log.info("%d class folders of %s hold no usable image (they keep their label index): %s",
                 len(empty), printable(root), printable(", ".join(empty[:LISTED_BAD_FILES])))
    return images
