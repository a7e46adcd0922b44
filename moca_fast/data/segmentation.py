"""Semantic segmentation sets, read in each data set's own layout (no conversion step).

  cityscapes  DIR/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with
              DIR/gtFine/<split>/<city>/<name>_gtFine_labelIds.png; the 34 label ids mapped to the 19 train ids,
              every other id ignored
  ade20k      DIR/images/<training|validation>/<name>.jpg with DIR/annotations/<...>/<name>.png
              (ADEChallengeData2016; DIR may also hold it); 150 classes, label 0 ignored, 1..150 -> 0..149
  voc         DIR/JPEGImages/<name>.jpg, DIR/SegmentationClass/<name>.png (palette indices),
              DIR/ImageSets/Segmentation/<split>.txt (VOC2012, or DIR/VOC2012, DIR/VOCdevkit/VOC2012);
              21 classes, 255 ignored
  folder      DIR/classes.txt (one class name a line), DIR/<split>/images/<name>.<jpg|png|...> with
              DIR/<split>/masks/<name>.png; pixel value i is class i, 255 ignored
Splits are `train` and `val` (ADE20K's training / validation). Labels come out as uint8 [H, W] class indices,
IGNORE (255) where no class is given.

Bad input, checked from the files' headers before any work: a missing mask, an image or mask that cannot be
opened, a mask whose size differs from its image: the pair is skipped, counted, and the first names logged
(`skipped` in the result). A set left with no pair, a missing layout folder or a bad class list: a ConfigError
naming it. A mask value outside the class set (and not ignored) is found when the mask is decoded: those pixels
are ignored, and the masks that held any are counted and named (`Labels.invalid_pixels`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moca_fast.errors import ConfigError

log = logging.getLogger("moca_fast.data")

IGNORE = 255
INVALID = -1  # a lookup-table entry: a raw mask value outside the class set
LAYOUTS = ("cityscapes", "ade20k", "voc", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SHOWN_NAMES = 5
MASK_MODES = ("L", "P", "I", "I;16")  # one channel of integers

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
#: Cityscapes label id of each train id (cityscapesscripts' labels.py); ids 0..33 exist, the rest is ignored
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_MAX_ID = 33
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
ADE20K_NUM_CLASSES = 150
ADE20K_SPLITS = {"train": "training", "val": "validation"}


@dataclass
class SegmentationSet:
    """Pairs (image file, mask file) of one split, the class names, and the lookup table raw mask value ->
    class index, IGNORE or INVALID (int16 [256])."""

    layout: str
    root: str
    split: str
    classes: list[str]
    images: list[str]
    masks: list[str]
    lookup: np.ndarray
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, keep: list[int]) -> "SegmentationSet":
        return SegmentationSet(self.layout, self.root, self.split, self.classes, [self.images[i] for i in keep],
                               [self.masks[i] for i in keep], self.lookup, self.skipped)

    def read(self, i: int) -> tuple[Image.Image, np.ndarray, str | None]:
        """(RGB image, labels uint8 [H, W], what was wrong or None). A pair that fails to decode (its headers
        were fine) comes back black and all IGNORE; mask values outside the class set become IGNORE."""
        try:
            with Image.open(self.masks[i]) as mask:
                raw = np.asarray(mask)
            image = Image.open(self.images[i]).convert("RGB")
        except (OSError, ValueError) as e:
            with Image.open(self.masks[i]) as mask:
                size = mask.size
            return Image.new("RGB", size), np.full(size[::-1], IGNORE, np.uint8), f"undecodable ({e})"
        labels, invalid = self.labels(raw)
        return image, labels, f"{invalid} pixels outside the class set" if invalid else None

    def labels(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        """Raw mask values [H, W] -> (class indices uint8 with IGNORE, count of pixels outside the class set)."""
        big = raw.astype(np.int64) >= len(self.lookup)
        mapped = self.lookup[np.clip(raw.astype(np.int64), 0, len(self.lookup) - 1)]
        mapped[big] = INVALID
        invalid = mapped == INVALID
        mapped[invalid] = IGNORE
        return mapped.astype(np.uint8), int(invalid.sum())


def identity_lookup(num_classes: int) -> np.ndarray:
    """Values 0..num_classes-1 are classes, 255 is ignored, anything else is invalid."""
    lookup = np.full(256, INVALID, dtype=np.int16)
    lookup[:num_classes] = np.arange(num_classes)
    lookup[IGNORE] = IGNORE
    return lookup


def cityscapes_lookup() -> np.ndarray:
    lookup = np.full(256, INVALID, dtype=np.int16)
    lookup[:CITYSCAPES_MAX_ID + 1] = IGNORE
    for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS):
        lookup[label_id] = train_id
    return lookup


def ade20k_lookup() -> np.ndarray:
    lookup = np.full(256, INVALID, dtype=np.int16)
    lookup[0] = IGNORE
    lookup[1:ADE20K_NUM_CLASSES + 1] = np.arange(ADE20K_NUM_CLASSES)
    return lookup


def detect_layout(root: str) -> str:
    """The layout of `root` from the folders it holds; a ConfigError when none fits."""
    r = Path(root)
    if (r / "leftImg8bit").is_dir() and (r / "gtFine").is_dir():
        return "cityscapes"
    if _ade20k_root(r) is not None:
        return "ade20k"
    if _voc_root(r) is not None:
        return "voc"
    if (r / "classes.txt").is_file():
        return "folder"
    raise ConfigError(f"--data {root}: not a segmentation set (no leftImg8bit/ + gtFine/ (Cityscapes), images/ + "
                      f"annotations/ (ADE20K), JPEGImages/ + SegmentationClass/ (VOC 2012) or classes.txt (folder))")


def _ade20k_root(r: Path) -> Path | None:
    for candidate in (r, r / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    return None


def _voc_root(r: Path) -> Path | None:
    for candidate in (r, r / "VOC2012", r / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    return None


def load_segmentation(root: str, split: str, layout: str = "auto") -> SegmentationSet:
    """The pairs of `split` ("train" or "val") in `root`, checked (see the module docstring)."""
    if not os.path.isdir(root):
        raise ConfigError(f"--data {root}: no such folder")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    classes, pairs, lookup = _READERS[layout](Path(root), split)
    found = SegmentationSet(layout, root, split, list(classes), [], [], lookup)
    for image, mask in pairs:
        problem = _pair_problem(image, mask)
        if problem is None:
            found.images.append(str(image))
            found.masks.append(str(mask))
        else:
            found.skipped.setdefault(problem, []).append(str(image))
    for problem, names in found.skipped.items():
        log.warning("%s %s: %d pairs skipped, %s: %s%s", layout, split, len(names), problem,
                    ", ".join(names[:SHOWN_NAMES]), " ..." if len(names) > SHOWN_NAMES else "")
    if not found.images:
        raise ConfigError(f"--data {root}: no usable {split} image with its mask ({layout} layout; "
                          f"{sum(map(len, found.skipped.values()))} pairs skipped)")
    return found


def _pair_problem(image: Path, mask: Path) -> str | None:
    """Why the pair cannot be used (from the file headers), or None."""
    if not mask.is_file():
        return "mask missing"
    sizes, modes = [], []
    for kind, path in (("image", image), ("mask", mask)):
        try:
            with Image.open(path) as opened:
                sizes.append(opened.size)
                modes.append(opened.mode)
        except (OSError, ValueError, Image.DecompressionBombError):
            return f"{kind} unreadable"
    if modes[1] not in MASK_MODES:
        return "mask is not one channel of class indices"
    if sizes[0] != sizes[1]:
        return "mask size differs from the image's"
    return None


def _cityscapes(root: Path, split: str):
    images_root = root / "leftImg8bit" / split
    if not images_root.is_dir():
        raise ConfigError(f"--data {root}: no leftImg8bit/{split} folder (Cityscapes layout)")
    pairs = []
    for image in sorted(images_root.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        pairs.append((image, root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"))
    return CITYSCAPES_CLASSES, pairs, cityscapes_lookup()


def _ade20k(root: Path, split: str):
    base = _ade20k_root(root)
    folder = ADE20K_SPLITS.get(split, split)
    images_root = base / "images" / folder if base is not None else root / "images" / folder
    if not images_root.is_dir():
        raise ConfigError(f"--data {root}: no images/{folder} folder (ADE20K layout)")
    pairs = [(image, base / "annotations" / folder / f"{image.stem}.png")
             for image in sorted(images_root.glob("*.jpg"))]
    return [f"class {i}" for i in range(1, ADE20K_NUM_CLASSES + 1)], pairs, ade20k_lookup()


def _voc(root: Path, split: str):
    base = _voc_root(root) or root
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise ConfigError(f"--data {root}: no ImageSets/Segmentation/{split}.txt (VOC 2012 layout)")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    pairs = [(base / "JPEGImages" / f"{n}.jpg", base / "SegmentationClass" / f"{n}.png") for n in names]
    return VOC_CLASSES, pairs, identity_lookup(len(VOC_CLASSES))


def read_class_list(path: Path) -> list[str]:
    """The class names of a folder set's classes.txt: at least 2, distinct, at most 255."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    if len(names) < 2:
        raise ConfigError(f"{path}: names {len(names)} class(es); a segmentation needs at least 2")
    if len(names) > IGNORE:
        raise ConfigError(f"{path}: names {len(names)} classes; at most {IGNORE} fit a mask (255 is ignored)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{path}: class {repeated[0]!r} is listed more than once")
    return names


def _folder(root: Path, split: str):
    classes = read_class_list(root / "classes.txt")
    images_root = root / split / "images"
    if not images_root.is_dir():
        raise ConfigError(f"--data {root}: no {split}/images folder (folder layout)")
    pairs = [(image, root / split / "masks" / f"{image.stem}.png") for image in sorted(images_root.iterdir())
             if image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith(".")]
    return classes, pairs, identity_lookup(len(classes))


_READERS = {"cityscapes": _cityscapes, "ade20k": _ade20k, "voc": _voc, "folder": _folder}
