"""k-NN evaluation of the teacher's [AVG] features, DINO protocol (as the official util/knn_utils.py).

Features: teacher final patch tokens averaged ([AVG]), L2-normalised. Each validation image takes the
k nearest training images by cosine similarity; neighbour j votes for its class with weight
exp(sim_j / T); top-1 / top-5 accuracy of the vote (k=20, T=0.07 by default).
Over ranks: every rank extracts features of its share of the images; the training bank is gathered on
every rank, each rank classifies its own validation share, and the correct counts are summed.
The classifier the trainer's in-training k-NN and `python -m moca_fast.eval knn` (the official sweep) share.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moca_fast.data import build_eval_loader
from moca_fast.distributed import rank_and_world
from moca_fast.model.fastpath import blocks_compiled

log = logging.getLogger("moca_fast.eval")

TOP5 = 5


@torch.no_grad()
def extract_features(model, loader, dtype: torch.dtype = torch.float32):
    """Teacher [AVG] features of this rank's share: ([n, C] fp32 L2-normalised, labels [n], indices [n]).

    With compiled blocks (moca_fast.model.fastpath) the teacher runs every batch at the loader's batch size (in
    training, the training batch size), the ragged last batch padded with zero images whose features are dropped
    (each image's features are its own: the ViT has no batch-coupled layer). Its blocks then see the one shape
    training compiles them for, instead of paying an inductor compilation per ragged size on a rank's first
    evaluation; the cost is the padding's forward, less than one batch per pass. Marking the batch dynamic would
    compile once more, and run every batch through unspecialised kernels; an uncompiled evaluation would run
    every batch at eager speed.
    """
    fixed = getattr(loader, "batch_size", None) if blocks_compiled(model) else None
    was_training = model.training
    model.eval()
    feats, labels, indices = [], [], []
    try:
        for images, batch_labels, batch_indices in loader:
            n = images.shape[0]
            if fixed is not None and n < fixed:
                images = torch.cat([images, images.new_zeros(fixed - n, *images.shape[1:])])
            feats.append(F.normalize(model.teacher_features(images.to(dtype))[:n].float(), dim=1))
            labels.append(batch_labels)
            indices.append(batch_indices)
    finally:
        model.train(was_training)
    if not feats:
        dim = model.config.embed_dim
        device = next(model.parameters()).device
        empty = torch.empty(0, dtype=torch.long, device=device)
        return torch.empty(0, dim, device=device), empty, empty
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def gather_bank(feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, num_images: int):
    """All ranks' (features [n_r, C], labels, indices) -> the full ([N, C], [N]) on every rank, by index."""
    _, world = rank_and_world()
    if world > 1:
        count = torch.tensor([feats.shape[0]], device=feats.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        most = int(max(c.item() for c in counts))
        pad = most - feats.shape[0]
        padded = (F.pad(feats, (0, 0, 0, pad)), F.pad(labels, (0, pad), value=-1), F.pad(indices, (0, pad), value=-1))
        gathered = []
        for t in padded:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            gathered.append(torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)]))
        feats, labels, indices = gathered
    if indices.numel() != num_images or torch.unique(indices).numel() != num_images:
        raise RuntimeError(f"k-NN bank: got {indices.numel()} features for {num_images} images")
    bank = torch.empty(num_images, feats.shape[1], dtype=feats.dtype, device=feats.device)
    bank_labels = torch.empty(num_images, dtype=labels.dtype, device=labels.device)
    bank[indices] = feats
    bank_labels[indices] = labels
    return bank, bank_labels


def knn_correct(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                k: int, temperature: float, num_classes: int, chunk: int = 1024) -> tuple[int, int]:
    """Correct top-1 and top-5 counts of weighted k-NN voting (one cell of knn_sweep_correct).

    bank [N, C] and queries [M, C] L2-normalised; labels long [N], [M] in [0, num_classes).
    """
    counts = knn_sweep_correct(bank, bank_labels, queries, query_labels, (k,), (temperature,), num_classes, chunk)
    return int(counts[0, 0, 0]), int(counts[0, 0, 1])


def knn_accuracy(model, train_loader, val_loader, k: int = 20, temperature: float = 0.07,
                 dtype: torch.dtype = torch.float32) -> dict:
    """Collective over ranks: {"top1", "top5"} in percent, plus the image counts."""
    bank, bank_labels = gather_bank(*extract_features(model, train_loader, dtype), train_loader.num_images)
    queries, query_labels, _ = extract_features(model, val_loader, dtype)
    num_classes = len(train_loader.classes)
    if len(val_loader.classes) != num_classes or list(val_loader.classes) != list(train_loader.classes):
        raise ValueError(f"k-NN train and val folders have different classes "
                         f"({len(train_loader.classes)} vs {len(val_loader.classes)})")
    c1, c5 = knn_correct(bank, bank_labels, queries, query_labels, k, temperature, num_classes)
    counts = torch.tensor([c1, c5, queries.shape[0]], dtype=torch.float64, device=bank.device)
    if rank_and_world()[1] > 1:
        dist.all_reduce(counts)
    c1, c5, total = counts.tolist()
    return {"top1": 100.0 * c1 / total, "top5": 100.0 * c5 / total, "k": k, "temperature": temperature,
            "train_images": train_loader.num_images, "val_images": int(total)}


def build_knn_loaders(cfg, train_root: str, val_root: str, rank: int, world_size: int, device):
    return (build_eval_loader(train_root, cfg, rank, world_size, device),
            build_eval_loader(val_root, cfg, rank, world_size, device))


# ---------------------------------------------------------------------- the sweep
#: the official eval_knn.py sweep
SWEEP_K = (10, 20)
SWEEP_TEMPERATURES = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.10, 0.12, 0.15, 0.20)


@torch.no_grad()
def knn_sweep_correct(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                      query_labels: torch.Tensor, ks, temperatures, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Correct (top-1, top-5) counts [len(ks), len(temperatures), 2] of weighted k-NN voting for every (k, T)
    cell, from one similarity top-k per query chunk (the largest k; smaller k read its first columns).

    Neighbour j votes exp(sim_j / T) for its class. The weights are computed as exp((sim_j - sim_1) / T), the
    same votes divided by one positive number per query (so the same ranking), which stays finite at any T
    (exp(sim / 0.001) overflows fp32 at sim > 0.09).
    """
    counts = torch.zeros(len(ks), len(temperatures), 2, dtype=torch.long)
    k_max = min(max(ks), bank.shape[0])
    for start in range(0, queries.shape[0], chunk):
        q, q_labels = queries[start:start + chunk], query_labels[start:start + chunk]
        sims, nearest = (q @ bank.T).topk(k_max, dim=1)  # sorted: sims[:, :1] is each query's largest
        sims = sims - sims[:, :1]
        neighbour_labels = bank_labels[nearest]
        for i, k in enumerate(ks):
            k = min(k, k_max)
            top5 = min(TOP5, k, num_classes)
            for j, temperature in enumerate(temperatures):
                votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=sims.dtype)
                votes.scatter_add_(1, neighbour_labels[:, :k], (sims[:, :k] / temperature).exp())
                hits = votes.topk(top5, dim=1).indices == q_labels[:, None]
                counts[i, j, 0] += int(hits[:, 0].sum())
                counts[i, j, 1] += int(hits.any(dim=1).sum())
    return counts
