"""Segmentation samples as tensors: augmented training crops and whole validation images.

Training (TrainCrops, the mmsegmentation pipeline of Segmenter and DINOv2 without photometric jitter): the
image scaled to `base` (its short side; None keeps it), then by a random ratio in `scale` (bilinear; labels
nearest), padded to at least the window (zeros after normalisation; labels IGNORE), a random window-sized crop,
a horizontal flip with p 0.5. Validation (WholeImages): the image scaled to `base`, labels at the file's own
resolution (the scores are computed there). Images are ImageNet-normalised float32 [3, H, W]; labels int64.
Each sample also carries its index and what was wrong with its mask (None, or why its pixels are ignored).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from moca_fast.data.segmentation import IGNORE, SegmentationSet
from moca_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SCALE = (0.5, 2.0)
FLIP_P = 0.5


def normalize(image: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def scaled_size(size: tuple[int, int], base: int | None, ratio: float = 1.0) -> tuple[int, int]:
    """(w, h) with the short side at base x ratio (base None: the file's own size x ratio)."""
    w, h = size
    factor = ratio * (base / min(w, h) if base else 1.0)
    return max(1, round(w * factor)), max(1, round(h * factor))


def rescaled(image: Image.Image, labels: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (bilinear) and labels (nearest) at size (w, h): (normalised [3, h, w], int64 [h, w])."""
    image = image.resize(size, Image.BILINEAR)
    labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
    return normalize(image), torch.from_numpy(labels.astype(np.int64))


class TrainCrops(Dataset):
    """Item (index, draw) -> (image [3, w, w], labels [w, w], index, problem): a random crop whose random choices
    come from a generator seeded by (seed, draw, index), so they do not depend on the loader's workers."""

    def __init__(self, data: SegmentationSet, window: int, base: int | None, seed: int, scale=SCALE):
        self.data, self.window, self.base, self.seed, self.scale = data, window, base, seed, scale

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]):
        i, draw = item
        rng = random.Random(f"{self.seed}/{draw}/{i}")
        image, labels, problem = self.data.read(i)
        x, y = rescaled(image, labels, scaled_size(image.size, self.base, rng.uniform(*self.scale)))
        x, y = crop(x, y, self.window, rng)
        if rng.random() < FLIP_P:
            x, y = x.flip(-1), y.flip(-1)
        return x, y, i, problem or ""


def crop(x: torch.Tensor, y: torch.Tensor, window: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """A random window x window crop of image [3, H, W] and labels [H, W], padded first where smaller."""
    h, w = y.shape
    pad_h, pad_w = max(window - h, 0), max(window - w, 0)
    x = F.pad(x, (0, pad_w, 0, pad_h))
    y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE)
    top, left = rng.randint(0, y.shape[0] - window), rng.randint(0, y.shape[1] - window)
    return x[:, top:top + window, left:left + window], y[top:top + window, left:left + window]


class WholeImages(Dataset):
    """(image [3, h, w] scaled to `base`, labels [H, W] at the mask's size, index, problem)."""

    def __init__(self, data: SegmentationSet, base: int | None):
        self.data, self.base = data, base

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, labels, problem = self.data.read(i)
        if self.base:
            image = image.resize(scaled_size(image.size, self.base), Image.BILINEAR)
        return normalize(image), torch.from_numpy(labels.astype(np.int64)), i, problem or ""


class EndlessBatches:
    """Batch sampler of TrainCrops: endless batches of (index, draw) of the images `indices`, for this rank.
    Pass p draws a permutation of them (torch.randperm, seeded seed + p); the passes are concatenated and rank
    r takes every world-th entry from r, so few images (low-shot) still fill a batch (repeats are new crops)."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.indices, self.batch_size, self.seed, self.rank, self.world = indices, batch_size, seed, rank, world

    def __iter__(self):
        per_step = self.batch_size * self.world
        for step, take in enumerate(endless_draws(len(self.indices), per_step, self.seed)):
            yield [(self.indices[j], step * per_step + k) for k, j in enumerate(take) if k % self.world == self.rank]


def endless_draws(n: int, count: int, seed: int):
    """Endless lists of `count` positions in 0..n-1: pass p is torch.randperm(n) seeded seed + p, the passes
    concatenated (a list may run across two passes, or over several when count > n)."""
    order, p = [], 0
    while True:
        while len(order) < count:
            order += torch.randperm(n, generator=torch.Generator().manual_seed(seed + p)).tolist()
            p += 1
        take, order = order[:count], order[count:]
        yield take


def one_image(batch: list) -> tuple:
    """collate_fn for WholeImages at batch size 1 (images differ in size): adds the batch dimension."""
    (x, y, i, problem), = batch
    return x[None], y[None], i, problem
