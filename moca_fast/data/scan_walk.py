"""Listing one class folder of a data set: its files with size, mtime and identity, in sorted-path order.

Each folder is entered once (by device and inode, so a symlink loop ends) and each file listed once;
every entry not listed is kept in `ignored` with why. The class folders are listed in parallel, one
task each (list_group); the scan then checks that no two of them entered the same sub-folder (else it
lists them again in one walk, in order, which is what a serial walk would give).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from moca_fast.data.image_list import PathTable
from moca_fast.data.scan_cache import LEGACY_DIR_NAME, read_journal

OLD_CACHE_FILE_NAME = ".moca_fast_scan.json.gz"


class Walk:
    """Folders entered and files listed so far; shared by the groups listed in one walk."""

    def __init__(self, entered: set[tuple[int, int]] | None = None):
        self.folders: set[tuple[int, int]] = set(entered or ())
        self.new_folders: list[tuple[int, int]] = []
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
        self.new_folders.append(key)
        return True

    def list_files(self, folder: str, rel: str, out: list) -> None:
        """Appends (path relative to the root, size, mtime_ns, dev, ino) of the files under `folder` (whose
        path relative to the root is `rel`, "" for the root), recursively, in sorted-path order.

        Hidden entries, pipes, sockets, devices and second paths to a file already listed are ignored;
        size -1 marks a file that cannot be stat'ed.
        """
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.ignored.append((folder, f"cannot list the folder ({e.strerror})"))
            return
        for entry in entries:
            name = entry.name
            entry_rel = f"{rel}/{name}" if rel else name
            if name.startswith("."):
                if not (name.startswith(LEGACY_DIR_NAME) or name.startswith(OLD_CACHE_FILE_NAME)):
                    self.ignored.append((entry.path, "hidden"))
                continue
            try:
                if entry.is_dir():
                    if self.enter(entry.path):
                        self.list_files(entry.path, entry_rel, out)
                elif entry.is_file():
                    st = entry.stat()
                    first = self.files.setdefault((st.st_dev, st.st_ino), entry.path) if st.st_ino else entry.path
                    if first != entry.path:
                        self.ignored.append((entry.path, f"duplicate: the same file as {first}"))
                    else:
                        out.append((entry_rel, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
                elif entry.is_symlink():  # a broken link: reported as unreadable
                    out.append((entry_rel, -1, -1, 0, 0))
                else:
                    self.ignored.append((entry.path, "not a regular file"))
            except OSError:
                out.append((entry_rel, -1, -1, 0, 0))


@dataclass
class GroupListing:
    """The files of one class folder (group) and the cached verdicts found for them."""

    group: str
    rels: PathTable  # paths relative to the data folder
    sizes: np.ndarray  # int64 [n], -1: cannot stat
    mtimes: np.ndarray  # int64 [n]
    keys: np.ndarray  # uint64 [n, 2]: (st_dev, st_ino), 0 when unknown
    verdicts: list  # str, or None when not cached (or changed since)
    ignored: list[tuple[str, str]]
    folders: list[tuple[int, int]]  # sub-folders entered (device, inode)
    stale: int = 0  # journal entries of files gone or changed
    needs_rewrite: bool = False  # torn or outdated journal
    cached: int = 0  # files whose verdict came from the journal


def list_group(task) -> GroupListing:
    """Lists one group of `root` with the folders `entered` already walked (the root and every class folder),
    and looks its files up in the group's journal. One task of the scan's listing phase."""
    root, group, entered, journal_path, expected_header = task
    return listing_of(Walk(entered), root, group, journal_path, expected_header)


def listing_of(walk: Walk, root: str, group: str, journal_path, expected_header) -> GroupListing:
    found: list = []
    ignored_before = len(walk.ignored)
    folders_before = len(walk.new_folders)
    walk.list_files(os.path.join(root, group) if group else root, group, found)
    cached, needs_rewrite = read_journal(journal_path, expected_header)
    verdicts, hits, changed = [], 0, 0
    for rel, size, mtime, _, _ in found:
        hit = cached.pop(rel, None)
        if hit is not None and size >= 0 and hit[0] == size and hit[1] == mtime:
            verdicts.append(hit[2])
            hits += 1
        else:
            verdicts.append(None)
            changed += hit is not None
    columns = list(zip(*found)) if found else [(), (), (), (), ()]
    keys = np.array(list(zip(columns[3], columns[4])), dtype=np.uint64).reshape(-1, 2)
    return GroupListing(group, PathTable.from_strings(columns[0]), np.array(columns[1], np.int64),
                        np.array(columns[2], np.int64), keys, verdicts, walk.ignored[ignored_before:],
                        walk.new_folders[folders_before:], stale=len(cached) + changed, needs_rewrite=needs_rewrite,
                        cached=hits)
