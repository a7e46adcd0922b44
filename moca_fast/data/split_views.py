"""The split pipeline's worker side: decode, the two crops resized and flipped, uint8 out with the photometric
parameters that moca_fast.data.photometric applies to the whole batch on the device.

The workers do only what needs the full-resolution image. A JPEG is decoded at a reduced DCT scale (PIL's
Image.draft: 1/2, 1/4 or 1/8, the largest that leaves both crops at least the view size on each side), which
cuts its decoding time; the crops then read the reduced image (a box in its coordinates), so such a view differs
from the PIL path's by the decoder's downscaling. Other images, and JPEGs whose crops are too small, are decoded
whole and cropped exactly as the PIL path does.
"""
from __future__ import annotations

import random

import torch
from PIL import Image

from moca_fast.data.photometric import pack_params
from moca_fast.data.scan import to_rgb
from moca_fast.data.transforms import VIEWS, ViewRecipe, crop_and_flip, draft_reduction, sample_views, to_uint8_tensor


class CropFlipTwoViews:
    """Image file + per-sample generator -> (view 1, view 2 uint8 [3, S, S], parameters float64 [2, P])."""

    def __init__(self, img_size: int, crop_min: float, recipes: tuple[ViewRecipe, ViewRecipe] = VIEWS):
        self.img_size = img_size
        self.crop_min = crop_min
        self.recipes = recipes

    def __call__(self, path: str, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with open(path, "rb") as f:
            img = Image.open(f)
            full_size = img.size
            views = sample_views(rng, img.width, img.height, self.crop_min, self.recipes)
            factor = draft_reduction([v.crop for v in views], self.img_size)
            if factor > 1:
                img.draft("RGB", (full_size[0] // factor, full_size[1] // factor))
            img.load()
        scale = float(factor) if img.size != full_size else 1.0
        img = to_rgb(img)
        view1, view2 = (to_uint8_tensor(crop_and_flip(img, v, self.img_size, (scale, scale))) for v in views)
        return view1, view2, torch.stack([pack_params(v) for v in views])
