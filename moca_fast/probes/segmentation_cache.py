"""The quick mode of the segmentation probe: patch features computed once, the head trained on them.

Each training image, scaled to the base size, is cut into window x window tiles (window_starts with stride =
window: non-overlapping, the last tile flush with the edge; an image smaller than the window is padded, its
padding IGNORE). Their features [N, D, g, g] and labels [N, w, w] are kept on the device. No augmentation.
Memory: N x D x g x g x 4 bytes (the demo: 600 images x 4 tiles x 128 x 4 x 4 x 4 B = 5 MB).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moca_fast.data.segmentation import IGNORE, SegmentationSet
from moca_fast.data.segmentation_loader import endless_draws, rescaled, scaled_size
from moca_fast.probes.segmentation_head import DenseFeatures, window_starts

TILE_BATCH = 64


def tiles(x: torch.Tensor, y: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image [3, H, W] and labels [H, W] -> non-overlapping tiles [n, 3, w, w], [n, w, w]."""
    h, w = y.shape
    x = F.pad(x, (0, max(window - w, 0), 0, max(window - h, 0)))
    y = F.pad(y, (0, max(window - w, 0), 0, max(window - h, 0)), value=IGNORE)
    boxes = [(top, left) for top in window_starts(y.shape[0], window, window)
             for left in window_starts(y.shape[1], window, window)]
    return (torch.stack([x[:, t:t + window, s:s + window] for t, s in boxes]),
            torch.stack([y[t:t + window, s:s + window] for t, s in boxes]))


@torch.no_grad()
def window_features(features: DenseFeatures, data: SegmentationSet, indices: list[int], window: int,
                    base: int | None, device, problems) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D, g, g] fp32, labels [N, w, w] int64) of the tiles of the images `indices`, on `device`;
    problems.add(index, why) for each mask partly or wholly ignored."""
    xs, ys = [], []
    for i in indices:
        image, labels, problem = data.read(i)
        problems.add(i, problem or "")
        x, y = tiles(*rescaled(image, labels, scaled_size(image.size, base)), window)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    feats = torch.cat([features(x[k:k + TILE_BATCH].to(device)) for k in range(0, len(x), TILE_BATCH)])
    return feats, y.to(device)


def cached_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, rank: int = 0,
                   world: int = 1):
    """Endless batches (features, labels) of this rank: pass p is randperm(N, seed + p), rank r takes every
    world-th tile from r; a batch may run across passes."""
    for take in endless_draws(len(feats), batch_size * world, seed):
        idx = torch.tensor(take[rank::world], device=feats.device)
        yield feats[idx], labels[idx]
