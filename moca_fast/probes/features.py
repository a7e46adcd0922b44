"""Features of a teacher over a list of images, each rank extracting its share and every rank receiving all of
them in image order (the evaluations' and the neighbours figure's feature banks)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from moca_fast.config import Config
from moca_fast.data import build_eval_loader
from moca_fast.data.scan import ImageList
from moca_fast.distributed import rank_and_world
from moca_fast.probes.knn import gather_bank


def subset(images: ImageList, keep: list[int]) -> ImageList:
    return images.subset(keep)


@torch.no_grad()
def extract(tokens_fn, images: ImageList, cfg: Config, device, batch_size: int, desc: str,
            features) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass over `images` (eval transform: resize + center crop), all ranks' shares gathered.

    tokens_fn: x -> (pre-norm tokens, normed tokens) [B, 1 + L, C]; features: {name: fn(pre, normed) -> [B, D]}.
    Returns ({name: [N, D] fp32 in image order}, labels [N]) on every rank.
    """
    rank, world_size = rank_and_world()
    loader = build_eval_loader(images, cfg, rank, world_size, device, batch_size)
    parts: dict[str, list] = {name: [] for name in features}
    indices = []
    for x, _, idx in tqdm(loader, desc=desc, disable=rank != 0, unit="batch", leave=False):
        pre, normed = tokens_fn(x)
        for name, fn in features.items():
            parts[name].append(fn(pre, normed))
        indices.append(idx)
    index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=device)
    out = {name: _gather(torch.cat(p) if p else torch.empty(0, 1, device=device), index, len(images))
           for name, p in parts.items()}
    return out, torch.tensor(images.labels, dtype=torch.long, device=device)


def _gather(feats: torch.Tensor, index: torch.Tensor, num_images: int) -> torch.Tensor:
    bank, _ = gather_bank(feats, torch.zeros_like(index), index, num_images)
    return bank
