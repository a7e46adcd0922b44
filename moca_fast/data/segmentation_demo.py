"""`--data demo` for segmentation: mosaics of the demo's MNIST digits, written once as a folder-layout set.

Each image is MOSAIC x MOSAIC cells of 28 x 28 pixels (56 x 56 grey pixels, saved as RGB PNG, lossless). A cell
holds a digit with probability DIGIT_P, else stays black; each digit is shifted by up to SHIFT pixels in its cell.
Labels: the box around a digit's strokes (its pixels of value >= STROKE) is that digit's class (0..9), every
other pixel is `background` (class 10); nothing is ignored. Boxes, not the strokes themselves: a stroke is 2-3
pixels wide and the demo ViT's patches are 7 pixels, so a probe of patch tokens could place strokes only as
blurs; which digit a region holds is what its tokens can tell. A shift rolls the digit within its cell (numpy
roll): a stroke within SHIFT pixels of the cell's edge would wrap to the other side, which MNIST's 4-pixel
margins mostly prevent. Training mosaics use the demo's training digits, validation mosaics its held-out digits
(moca_fast.data.demo.demo_split), so no digit is seen in both. The draw is seeded (SEED): the set is the same on
every machine. Written atomically under <moca_fast cache>/demo_segmentation
in the folder layout of moca_fast.data.segmentation (classes.txt, {train,val}/{images,masks}).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from moca_fast.data.demo import DIGIT_SIDE, build_once, demo_split, load_mnist_5k
from moca_fast.data.scan_cache import cache_root

MOSAIC = 2
DIGIT_P = 0.8
SHIFT = 4
STROKE = 128
SEED = 0
COUNTS = {"train": 600, "val": 150}
CLASSES = [str(d) for d in range(10)] + ["background"]
BACKGROUND = 10
DONE = "classes.txt"  # written last: its presence means the set is complete


def mosaic(digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One mosaic from `digits` [N, 28, 28] uint8 with their `labels` [N]: (pixels uint8 [S, S], classes uint8
    [S, S]) with S = MOSAIC x 28."""
    side = MOSAIC * DIGIT_SIDE
    pixels = np.zeros((side, side), np.uint8)
    classes = np.full((side, side), BACKGROUND, np.uint8)
    for row in range(MOSAIC):
        for col in range(MOSAIC):
            if rng.random() >= DIGIT_P:
                continue
            i = int(rng.integers(len(digits)))
            dy, dx = rng.integers(-SHIFT, SHIFT + 1, size=2)
            digit = np.roll(digits[i], (int(dy), int(dx)), axis=(0, 1))
            cell = (slice(row * DIGIT_SIDE, (row + 1) * DIGIT_SIDE), slice(col * DIGIT_SIDE, (col + 1) * DIGIT_SIDE))
            pixels[cell] = digit
            rows, cols = np.nonzero(digit >= STROKE)
            if len(rows):
                classes[cell][rows.min():rows.max() + 1, cols.min():cols.max() + 1] = labels[i]
    return pixels, classes


def _write(folder: Path) -> None:
    pixels, labels = load_mnist_5k()
    held_out = demo_split(labels)
    rng = np.random.default_rng(SEED)
    for split, count in COUNTS.items():
        rows = held_out if split == "val" else ~held_out
        for sub in ("images", "masks"):
            (folder / split / sub).mkdir(parents=True)
        for n in range(count):
            image, classes = mosaic(pixels[rows], labels[rows], rng)
            Image.fromarray(image, "L").convert("RGB").save(folder / split / "images" / f"{n:04d}.png")
            Image.fromarray(classes, "L").save(folder / split / "masks" / f"{n:04d}.png")
    (folder / DONE).write_text("\n".join(CLASSES) + "\n")


def prepare_segmentation_demo(cache_dir: str | os.PathLike | None = None) -> str:
    """The demo segmentation folder, written on first use (moca_fast.data.demo.build_once)."""
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "demo_segmentation"
    build_once(folder, DONE, _write)
    return str(folder)
