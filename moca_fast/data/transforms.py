"""The paper's two augmented views (BYOL recipe, official util/transforms.py) and the eval transform.

The official code draws its random parameters from the global torch/python generators inside
torchvision transforms. Here every random choice is drawn from an explicit `random.Random` (one
per sample, seeded from (seed, epoch, global position)), so the views are a deterministic function
of the sample's position, whatever the worker scheduling. The distributions and the image
operations (torchvision's PIL path) are the official ones:

  view 1: RandomResizedCrop(size, scale=(crop_min, 1), ratio=(3/4, 4/3)), bilinear
          ColorJitter(0.4, 0.4, 0.2, 0.1) in random order, with p 0.8
          grayscale with p 0.2
          Gaussian blur, radius ~ U(0.1, 2), with p 1.0
          horizontal flip with p 0.5
  view 2: the same with blur p 0.1, then solarize (threshold 128) with p 0.2 before the flip.

Views leave the workers as uint8 [3, H, W]; `Normalizer` turns a batch into ImageNet-normalised
float32 on the device with the same arithmetic as ToTensor + Normalize.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE_MAX = 1.0
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
JITTER_P = 0.8
JITTER_BRIGHTNESS = 0.4
JITTER_CONTRAST = 0.4
JITTER_SATURATION = 0.2
JITTER_HUE = 0.1
GRAYSCALE_P = 0.2
BLUR_RADIUS = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
FLIP_P = 0.5
EVAL_RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class ViewRecipe:
    """The probabilities of one view's random operations; the paper's views differ in blur and solarize."""

    blur_p: float
    solarize_p: float
    jitter_p: float = JITTER_P
    grayscale_p: float = GRAYSCALE_P
    flip_p: float = FLIP_P


VIEW1 = ViewRecipe(blur_p=1.0, solarize_p=0.0)
VIEW2 = ViewRecipe(blur_p=0.1, solarize_p=0.2)
VIEWS = (VIEW1, VIEW2)

_JITTER_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


@dataclass(frozen=True)
class ViewParams:
    """All random choices of one view. crop = (top, left, height, width) in source pixels;
    jitter = the (operation, factor) pairs in the order applied, empty when jitter is off."""

    crop: tuple[int, int, int, int]
    jitter: tuple[tuple[str, float], ...]
    grayscale: bool
    blur_radius: float | None
    solarize: bool
    flip: bool


def sample_crop(rng: random.Random, width: int, height: int,
                scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with an explicit generator: (top, left, h, w)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_jitter(rng: random.Random, p: float = JITTER_P) -> tuple[tuple[str, float], ...]:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) applied with probability p: the ops in a random order."""
    if rng.random() >= p:
        return ()
    factors = {
        "brightness": rng.uniform(1 - JITTER_BRIGHTNESS, 1 + JITTER_BRIGHTNESS),
        "contrast": rng.uniform(1 - JITTER_CONTRAST, 1 + JITTER_CONTRAST),
        "saturation": rng.uniform(1 - JITTER_SATURATION, 1 + JITTER_SATURATION),
        "hue": rng.uniform(-JITTER_HUE, JITTER_HUE),
    }
    order = rng.sample(list(factors), len(factors))
    return tuple((name, factors[name]) for name in order)


def sample_view_params(rng: random.Random, width: int, height: int, recipe: ViewRecipe,
                       crop_min: float) -> ViewParams:
    crop = sample_crop(rng, width, height, (crop_min, CROP_SCALE_MAX))
    jitter = sample_jitter(rng, recipe.jitter_p)
    grayscale = rng.random() < recipe.grayscale_p
    blur_radius = rng.uniform(*BLUR_RADIUS) if rng.random() < recipe.blur_p else None
    solarize = rng.random() < recipe.solarize_p
    flip = rng.random() < recipe.flip_p
    return ViewParams(crop, jitter, grayscale, blur_radius, solarize, flip)


def sample_views(rng: random.Random, width: int, height: int, crop_min: float,
                 recipes: tuple[ViewRecipe, ...] = VIEWS) -> list[ViewParams]:
    """The random choices of every view of one image, in order: what both backends apply."""
    return [sample_view_params(rng, width, height, recipe, crop_min) for recipe in recipes]


def apply_view(img: Image.Image, params: ViewParams, size: int) -> Image.Image:
    """The official op sequence on an RGB PIL image; returns an RGB size x size PIL image."""
    top, left, h, w = params.crop
    img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    for name, factor in params.jitter:
        img = _JITTER_OPS[name](img, factor)
    if params.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if params.blur_radius is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_radius))
    if params.solarize:
        img = ImageOps.solarize(img, SOLARIZE_THRESHOLD)
    if params.flip:
        img = TF.hflip(img)
    return img


def draft_reduction(crops: list[tuple[int, int, int, int]], size: int) -> int:
    """The largest JPEG DCT scaling (8, 4, 2, else 1) that leaves every crop at least `size` pixels on each side."""
    smallest = min(min(h, w) for _, _, h, w in crops)
    return next((factor for factor in (8, 4, 2) if smallest >= size * factor), 1)


def crop_and_flip(img: Image.Image, params: ViewParams, size: int, scale: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """The view's crop resized to size x size (one bilinear antialiased pass) and flipped: the geometric part of
    apply_view. scale = (x, y) source pixels per pixel of `img` (a JPEG decoded at a reduced scale); at (1, 1)
    exactly apply_view's crop."""
    top, left, h, w = params.crop
    if scale == (1.0, 1.0):
        img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    else:
        box = (left / scale[0], top / scale[1], (left + w) / scale[0], (top + h) / scale[1])
        img = img.resize((size, size), Image.BILINEAR, box=box)
    return TF.hflip(img) if params.flip else img


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class TwoViewTransform:
    """RGB PIL image + per-sample generator -> (view 1, view 2), each uint8 [3, size, size]."""

    def __init__(self, img_size: int, crop_min: float, recipes: tuple[ViewRecipe, ViewRecipe] = VIEWS):
        self.img_size = img_size
        self.crop_min = crop_min
        self.recipes = recipes

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        views = [to_uint8_tensor(apply_view(img, params, self.img_size))
                 for params in sample_views(rng, img.width, img.height, self.crop_min, self.recipes)]
        return views[0], views[1]


class EvalTransform:
    """Resize the shorter side to int(img_size * 256/224) (bicubic), center crop -> uint8 [3, S, S]."""

    def __init__(self, img_size: int):
        self.img_size = img_size
        self.resize_to = int(img_size * EVAL_RESIZE_RATIO)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = TF.resize(img, self.resize_to, InterpolationMode.BICUBIC, antialias=True)
        return to_uint8_tensor(TF.center_crop(img, [self.img_size, self.img_size]))


class Normalizer:
    """uint8 [B, 3, H, W] (any device) -> float32 normalised on `device`, as ToTensor + Normalize."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1).to(self.device)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1).to(self.device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).to(torch.float32)
        return x.div_(255).sub_(self.mean).div_(self.std)
