"""Finds the images of a folder, checks that each one decodes, and caches the verdicts.

Layout: class sub-folders (ImageNet style, images found recursively inside each class folder;
label = index of the folder name in sorted order) or a flat folder of images (one class).
A file is a candidate if its extension is an image extension (case-insensitive) or its first
bytes are a JPEG/PNG/BMP/WEBP signature. Every candidate is really decoded once (JPEGs cheaply,
at 1/8 scale through PIL's draft mode, which still parses the whole bitstream so truncation is
caught). Verdicts are cached in a gzip'd JSON file beside the data (or under
<cache root>/scans/ when the folder is read-only), keyed on each file's size and mtime, so a
re-run lists the folder but decodes only new or changed files.
Each folder is walked once (by device and inode: a symlink loop ends, a `self -> .` link adds
nothing) and each file is used once; every entry not used is counted and named in the log: bad images
in `skipped`, the rest (non-images, hidden, second links, loops, files beside class folders) in `ignored`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moca_fast.config import ConfigError

log = logging.getLogger("moca_fast.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_IMAGE_SIDE = 2
CACHE_FILE_NAME = ".moca_fast_scan.json.gz"
CACHE_FORMAT = 1
LISTED_BAD_FILES = 20

_OK, _NOT_IMAGE, _BAD = "ok", "skip", "bad:"
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


@dataclass
class ImageList:
    """The usable images of a folder: files[i] (absolute path) has label labels[i] into classes."""

    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # bad images: (path, why)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # everything else not used: (path, why)
    root: str = ""

    def __len__(self) -> int:
        return len(self.files)


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


def check_image(path: str) -> str | None:
    """Decodes one file cheaply; None when usable, else a one-line reason."""
    try:
        f = open(path, "rb")
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e.strerror})"
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            return "empty file (0 bytes)"
        try:
            img = Image.open(f)
            width, height = img.size
            if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
                return f"too small: {width}x{height} pixels (need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})"
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))
            img.load()
            to_rgb(img)
        except Image.UnidentifiedImageError:
            return "not an image PIL can decode"
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on corrupt data
            return f"corrupt or truncated ({type(e).__name__}: {_one_line(e)})"
    return None


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


class _Walk:
    """One walk of a data folder: each folder is entered once (by device and inode, so a symlink loop
    ends), each file is listed once, and every entry not listed is kept in `ignored` with why."""

    def __init__(self):
        self.folders: set[tuple[int, int]] = set()
        self.files: dict[tuple[int, int], str] = {}
        self.ignored: list[tuple[str, str]] = []

    def enter(self, folder: str) -> bool:
        """False (noted in `ignored`) when `folder` was entered before under another path."""
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in self.folders:
            self.ignored.append((folder, "folder already walked (a symlink loop or a second link to it)"))
            return False
        self.folders.add(key)
        return True

    def list_files(self, folder: str) -> list[tuple[str, int, int]]:
        """(path, size, mtime_ns) of the files under folder, recursively, in sorted-path order.

        Hidden entries, pipes, sockets, devices and second paths to a file already listed are ignored;
        size -1 marks a file that cannot be stat'ed.
        """
        out = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.ignored.append((folder, f"cannot list the folder ({e.strerror})"))
            return out
        for entry in entries:
            if entry.name.startswith("."):
                if not entry.name.startswith(CACHE_FILE_NAME):
                    self.ignored.append((entry.path, "hidden"))
                continue
            try:
                if entry.is_dir():
                    if self.enter(entry.path):
                        out.extend(self.list_files(entry.path))
                elif entry.is_file():
                    st = entry.stat()
                    first = self.files.setdefault((st.st_dev, st.st_ino), entry.path) if st.st_ino else entry.path
                    if first != entry.path:
                        self.ignored.append((entry.path, f"duplicate: the same file as {first}"))
                    else:
                        out.append((entry.path, st.st_size, st.st_mtime_ns))
                elif entry.is_symlink():  # a broken link: reported as unreadable
                    out.append((entry.path, -1, -1))
                else:
                    self.ignored.append((entry.path, "not a regular file"))
            except OSError:
                out.append((entry.path, -1, -1))
        return out


def _cache_paths(root: str) -> list[Path]:
    digest = hashlib.sha1(root.encode()).hexdigest()[:16]
    return [Path(root) / CACHE_FILE_NAME, cache_root() / "scans" / f"{digest}.json.gz"]


def _load_cache(root: str) -> dict[str, list]:
    for path in _cache_paths(root):
        try:
            with gzip.open(path, "rt") as f:
                data = json.load(f)
            if data.get("format") == CACHE_FORMAT:
                return data["files"]
        except (OSError, ValueError, KeyError, EOFError):
            continue
    return {}


def _save_cache(root: str, entries: dict[str, list]) -> None:
    payload = json.dumps({"format": CACHE_FORMAT, "root": root, "files": entries}, separators=(",", ":"))
    for path in _cache_paths(root):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(tmp, "wt", compresslevel=1) as f:
                f.write(payload)
            os.replace(tmp, path)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    log.warning("could not write the scan cache for %s anywhere; the next run decodes it again", root)


def _verdict(path: str, size: int) -> str:
    if size < 0:
        return _BAD + "unreadable (cannot stat: broken link or no permission)"
    if not path.lower().endswith(IMAGE_EXTENSIONS) and not _has_image_signature(path):
        return _NOT_IMAGE
    reason = check_image(path)
    return _OK if reason is None else _BAD + reason


def _check_all(listing: list[tuple[str, int, int]], root: str) -> dict[str, list]:
    """Verdict per relative path, decoding only files absent from the cache or changed since."""
    cached = _load_cache(root)
    entries, todo = {}, []
    for path, size, mtime in listing:
        rel = os.path.relpath(path, root)
        hit = cached.get(rel)
        if hit is not None and hit[0] == size and hit[1] == mtime and size >= 0:
            entries[rel] = hit
        else:
            todo.append((rel, path, size, mtime))
    if todo:
        started = time.monotonic()
        workers = min(32, 2 * (os.cpu_count() or 1))
        log.info("checking %d new or changed files in %s with %d threads", len(todo), root, workers)
        with ThreadPoolExecutor(workers) as pool:
            for lo in range(0, len(todo), 4096):
                chunk = todo[lo:lo + 4096]
                for (rel, _, size, mtime), verdict in zip(chunk, pool.map(lambda t: _verdict(t[1], t[2]), chunk)):
                    entries[rel] = [size, mtime, verdict]
                if time.monotonic() - started > 30 and lo // 4096 % 16 == 15:
                    log.info("checked %d/%d files", lo + len(chunk), len(todo))
    if todo or len(entries) != len(cached):
        _save_cache(root, entries)
    return entries


def _report_bad(root: str, skipped: list[tuple[str, str]], bad_files: str) -> None:
    if not skipped:
        return
    if bad_files == "error":
        path, reason = skipped[0]
        raise ConfigError(f"bad image file {path}: {reason} ({len(skipped)} bad in {root}; "
                          f"bad_files=skip would skip them)")
    shown = "\n  ".join(f"{p}: {r}" for p, r in skipped[:LISTED_BAD_FILES])
    more = f"\n  ... {len(skipped) - LISTED_BAD_FILES} more" if len(skipped) > LISTED_BAD_FILES else ""
    log.warning("skipping %d bad image files in %s:\n  %s%s", len(skipped), root, shown, more)


def _report_ignored(root: str, ignored: list[tuple[str, str]]) -> None:
    if not ignored:
        return
    counts = Counter(reason.split(":")[0].split(" (")[0] for _, reason in ignored)
    shown = "\n  ".join(f"{p}: {r}" for p, r in ignored[:LISTED_BAD_FILES])
    more = f"\n  ... {len(ignored) - LISTED_BAD_FILES} more" if len(ignored) > LISTED_BAD_FILES else ""
    log.warning("not using %d entries of %s (%s):\n  %s%s", len(ignored), root,
                ", ".join(f"{n} {reason}" for reason, n in counts.items()), shown, more)


def scan_images(root: str | os.PathLike, bad_files: str = "skip") -> ImageList:
    """Lists and checks the images of `root` (class sub-folders or flat); see the module docstring.

    bad_files="skip" logs and skips undecodable files; "error" raises ConfigError naming the first.
    """
    if bad_files not in ("skip", "error"):
        raise ConfigError(f"bad_files={bad_files!r} must be 'skip' or 'error'")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {root} does not exist or is not a folder")
    walk = _Walk()
    walk.enter(root)
    top = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e for e in top if not e.name.startswith(".") and e.is_dir() and walk.enter(e.path)]
    if class_dirs:
        classes = [e.name for e in class_dirs]
        listing = [(item, label) for label, d in enumerate(class_dirs) for item in walk.list_files(d.path)]
        walk.ignored.extend((e.path, "beside the class folders") for e in top
                            if not e.name.startswith(".") and not e.is_dir())
    else:
        walk.ignored.clear()  # the links to root itself, found again below
        classes = [os.path.basename(root)]
        listing = [(item, 0) for item in walk.list_files(root)]
    entries = _check_all([item for item, _ in listing], root)

    files, labels, skipped, per_class = [], [], [], [0] * len(classes)
    for (path, _, _), label in listing:
        verdict = entries[os.path.relpath(path, root)][2]
        if verdict == _OK:
            files.append(path)
            labels.append(label)
            per_class[label] += 1
        elif verdict.startswith(_BAD):
            skipped.append((path, verdict[len(_BAD):]))
        else:
            walk.ignored.append((path, "not an image (neither its extension nor its first bytes)"))
    _report_ignored(root, walk.ignored)
    _report_bad(root, skipped, bad_files)
    if not files:
        raise ConfigError(f"data folder {root} holds no usable images (extensions: "
                          f"{', '.join(IMAGE_EXTENSIONS)}; {len(skipped)} bad files)")
    empty = [c for c, n in zip(classes, per_class) if n == 0]
    if empty:
        log.info("%d class folders of %s hold no usable image (they keep their label index): %s",
                 len(empty), root, ", ".join(empty[:LISTED_BAD_FILES]))
    return ImageList(files=files, labels=labels, classes=classes, skipped=skipped, ignored=walk.ignored, root=root)
