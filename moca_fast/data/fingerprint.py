"""What identifies the images a run trains on, so that a resume can tell whether they changed.

The identity of a data set is its number of images, its images per class, and BLAKE2b fingerprints of its
file list: one of the whole (relative path, label) sequence in training order, which fixes every epoch's
data order, and one of each class's relative paths, which says which classes changed. It is computed from
relative paths, so a data folder moved elsewhere keeps its identity. Its cost at ImageNet size, on rank 0
only, before step 1: `python -m moca_fast.data.fingerprint` times it on a synthetic ImageNet-style ImageList
of 1,281,167 paths in 1,000 classes: 0.85 s of CPU on this project's 2-core machine (2026-12-06), 82 kB in
each checkpoint's meta.json.
"""
from __future__ import annotations

import hashlib
import sys
import time
from typing import Sequence

import numpy as np

LISTED_CLASSES = 8


def file_list_fingerprint(relative_paths: Sequence[str], labels: Sequence[int] | None = None) -> str:
    """Hex BLAKE2b-128 of the sequence of relative paths (and labels, when given), order included.

    The paths are joined with NUL, which no path contains, so two different lists never join alike.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\0".join(relative_paths).encode("utf-8", "surrogateescape"))
    if labels is not None:
        digest.update(b"\0labels\0" + np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def data_identity(relative_paths: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> dict:
    """{"images", "fingerprint", "classes": {name: {"images", "fingerprint"}}} of a labelled file list."""
    relative_paths = list(relative_paths)  # one pass over a PathTable, not one decode per index
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    by_class = np.argsort(labels, kind="stable")
    per_class, start = {}, 0
    for name, count in zip(classes, counts.tolist()):
        members = by_class[start:start + count]
        per_class[name] = {"images": count, "fingerprint": file_list_fingerprint([relative_paths[i] for i in members])}
        start += count
    return {"images": len(relative_paths), "fingerprint": file_list_fingerprint(relative_paths, labels),
            "classes": per_class}


def image_list_identity(images) -> dict:
    """data_identity of a scanned ImageList (its files relative to its root)."""
    return data_identity(images.relpaths, images.labels, images.classes)


def synthetic_identity(num_images: int) -> dict:
    return {"images": num_images, "synthetic": True}


def describe_data_change(old: dict, new: dict) -> str | None:
    """None if `new` is the data set `old` describes; else what changed, in one line."""
    if old.get("synthetic") or new.get("synthetic"):
        if old == new:
            return None
        kinds = ["synthetic data" if d.get("synthetic") else "an image folder" for d in (old, new)]
        return f"{kinds[0]} of {old['images']} images -> {kinds[1]} of {new['images']} images"
    if old["fingerprint"] == new["fingerprint"]:
        return None
    before, after = old["classes"], new["classes"]
    changes = []
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name), after.get(name)
        if was is None:
            changes.append(f"class {name} added ({now['images']} images)")
        elif now is None:
            changes.append(f"class {name} removed ({was['images']} images)")
        elif was["images"] != now["images"]:
            changes.append(f"{name} {was['images']} -> {now['images']} images ({now['images'] - was['images']:+d})")
        elif was["fingerprint"] != now["fingerprint"]:
            changes.append(f"{name} other files ({now['images']} images, some added and as many removed)")
    if not changes:
        changes.append("the same files per class, in another order or under other labels")
    if len(changes) > LISTED_CLASSES:
        changes[LISTED_CLASSES:] = [f"{len(changes) - LISTED_CLASSES} more classes changed"]
    return f"{old['images']} -> {new['images']} images: {', '.join(changes)}"


def _time_at_imagenet_size(num_images: int = 1_281_167, num_classes: int = 1000) -> None:
    """Prints the cost of image_list_identity on a synthetic ImageNet-style ImageList (no files needed)."""
    from moca_fast.data.image_list import synthetic_image_list

    images = synthetic_image_list(num_images, num_classes)
    for _ in range(3):
        cpu, wall = time.process_time(), time.perf_counter()
        identity = image_list_identity(images)
        print(f"identity of {num_images:,} files in {num_classes:,} classes: {time.process_time() - cpu:.2f} s of CPU "
              f"({time.perf_counter() - wall:.2f} s wall), {len(str(identity)) / 1e3:.0f} kB in meta.json")


if __name__ == "__main__":
    _time_at_imagenet_size(*(int(a) for a in sys.argv[1:]))
