"""The list of usable images, stored so that loader workers share it without copying it.

A Python list of 1.28 M path strings is 1.28 M objects: every worker process that reads an entry
writes its reference count, so the pages it touches are copied into the worker (copy-on-write); over
a few epochs each worker holds its own copy (~130 MB at ImageNet size). Here the paths are one
numpy byte buffer plus an offsets array and the labels one int64 array: reading an entry writes
nothing, so the forked workers keep sharing the parent's pages.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class PathTable(Sequence):
    """Strings (file paths) in one uint8 buffer: item i is prefix + buffer[offsets[i]:offsets[i+1]].

    Behaves as a read-only sequence of str (os.fsdecode of the bytes, so any file name round-trips);
    equal to a list or tuple of the same strings.
    """

    __slots__ = ("buffer", "offsets", "prefix", "_prefix_bytes", "_bytes", "_starts")

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, prefix: str = ""):
        self.buffer = np.ascontiguousarray(buffer, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.prefix = prefix
        self._prefix_bytes = os.fsencode(prefix)
        # read-only views that index to Python ints and bytes without numpy scalars (a worker's hot path)
        self._bytes = memoryview(self.buffer).toreadonly()
        self._starts = memoryview(self.offsets).toreadonly()

    def __reduce__(self):
        return PathTable, (self.buffer, self.offsets, self.prefix)

    @classmethod
    def from_strings(cls, strings, prefix: str = "") -> "PathTable":
        encoded = [os.fsencode(s) for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets, prefix)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"path index {index} out of range for {n} paths")
        index %= n
        return os.fsdecode(self._prefix_bytes + self._bytes[self._starts[index]:self._starts[index + 1]].tobytes())

    def __iter__(self):
        data, offsets, prefix = self.buffer.tobytes(), self.offsets.tolist(), self._prefix_bytes
        for start, stop in zip(offsets[:-1], offsets[1:]):
            yield os.fsdecode(prefix + data[start:stop])

    def __eq__(self, other) -> bool:
        if isinstance(other, PathTable):
            return list(self) == list(other)
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths, prefix={self.prefix!r})"

    def take(self, indices) -> "PathTable":
        """The items at `indices` (an int array), as a new table with the same prefix."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, stops = self.offsets[indices], self.offsets[indices + 1]
        lengths = stops - starts
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # byte k of the result comes from starts[item] + (k - offsets[item])
        source = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return PathTable(self.buffer[source], offsets, self.prefix)

    def with_prefix(self, prefix: str) -> "PathTable":
        return PathTable(self.buffer, self.offsets, prefix)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


def concat_tables(tables: list[PathTable], prefix: str = "") -> PathTable:
    """One table of the items of `tables` in order (their own prefixes are dropped)."""
    if not tables:
        return PathTable(np.zeros(0, np.uint8), np.zeros(1, np.int64), prefix)
    shifts = np.cumsum([0] + [t.offsets[-1] for t in tables[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [t.offsets[1:] + s for t, s in zip(tables, shifts)])
    return PathTable(np.concatenate([t.buffer for t in tables]), offsets, prefix)


@dataclass(eq=False)
class ImageList:
    """The usable images of a folder: files[i] (absolute path) has label labels[i] into classes.

    files is a PathTable over the paths relative to root (relpaths); labels an int64 array;
    pil_only the indices of files in a format only PIL decodes (DALI reads PNG copies of them).
    Lists given to the constructor are converted to those forms.
    """

    files: Sequence[str]
    labels: np.ndarray
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # bad images: (path, why)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # everything else not used: (path, why)
    root: str = ""
    pil_only: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self):
        if not isinstance(self.files, PathTable):
            self.files = PathTable.from_strings(self.files)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.pil_only = np.asarray(self.pil_only, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def relpaths(self) -> Sequence[str]:
        """The paths relative to root (the files' own strings when they are not under root)."""
        table = self.files
        if table.prefix:
            return table.with_prefix("")
        return [os.path.relpath(f, self.root) for f in table] if self.root else table

    def subset(self, indices) -> "ImageList":
        """The images at `indices`, in that order (labels, classes and root kept)."""
        indices = np.asarray(indices, dtype=np.int64)
        position = {int(i): k for k, i in enumerate(indices)}
        pil_only = [position[int(i)] for i in self.pil_only if int(i) in position]
        return ImageList(self.files.take(indices), self.labels[indices], list(self.classes), list(self.skipped),
                         list(self.ignored), self.root, np.asarray(pil_only, np.int64))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ImageList):
            return NotImplemented
        return (self.files == other.files and np.array_equal(self.labels, other.labels)
                and self.classes == other.classes and self.skipped == other.skipped
                and self.ignored == other.ignored and self.root == other.root
                and np.array_equal(self.pil_only, other.pil_only))

    __hash__ = None


def synthetic_image_list(n: int, classes: int = 1000, root: str = "/data/imagenet/train") -> ImageList:
    """n ImageNet-like paths (root/<wnid>/<wnid>_<i>.JPEG in `classes` folders) without files: the list a
    rank holds at ImageNet scale, for memory tests and benchmarks."""
    names = [f"n{1440764 + 97 * c:08d}" for c in range(classes)]
    paths = (f"{names[i % classes]}/{names[i % classes]}_{i:08d}.JPEG" for i in range(n))
    return ImageList(PathTable.from_strings(paths, prefix=root + "/"), np.arange(n) % classes, names, root=root)
