"""k-NN evaluation of the teacher's [AVG] features, DINO protocol (as the official util/knn_utils.py).

Features: teacher final patch tokens averaged ([AVG]), L2-normalised. Each validation image takes the
k nearest training images by cosine similarity; neighbour j votes for its class with weight
exp(sim_j / T); top-1 / top-5 accuracy of the vote (k=20, T=0.07 by default).
Over ranks: every rank extracts features of its share of the images; the training bank is gathered on
every rank, each rank classifies its own validation share, and the correct counts are summed.

Standalone:  python -m moca_fast.eval.knn --checkpoint RUN_OR_CHECKPOINT --data DIR
(DIR holds train/ and val/ class folders; or --train DIR --val DIR).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moca_fast.distributed import rank_and_world

log = logging.getLogger("moca_fast.eval")

TOP5 = 5


@torch.no_grad()
def extract_features(model, loader, dtype: torch.dtype = torch.float32):
    """Teacher [AVG] features of this rank's share: ([n, C] fp32 L2-normalised, labels [n], indices [n])."""
    was_training = model.training
    model.eval()
    feats, labels, indices = [], [], []
    try:
        for images, batch_labels, batch_indices in loader:
            feats.append(F.normalize(model.teacher_features(images.to(dtype)).float(), dim=1))
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


@torch.no_grad()
def knn_correct(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                k: int, temperature: float, num_classes: int, chunk: int = 1024) -> tuple[int, int]:
    """Correct top-1 and top-5 counts of weighted k-NN voting.

    bank [N, C] and queries [M, C] L2-normalised; labels long [N], [M] in [0, num_classes).
    """
    k = min(k, bank.shape[0])
    top5 = min(TOP5, k, num_classes)
    correct1 = correct5 = 0
    for start in range(0, queries.shape[0], chunk):
        q, q_labels = queries[start:start + chunk], query_labels[start:start + chunk]
        sims, nearest = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=sims.dtype)
        votes.scatter_add_(1, bank_labels[nearest], (sims / temperature).exp())
        predictions = votes.topk(top5, dim=1).indices
        hits = predictions == q_labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    return correct1, correct5


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
    from moca_fast.data import build_eval_loader

    return (build_eval_loader(train_root, cfg, rank, world_size, device),
            build_eval_loader(val_root, cfg, rank, world_size, device))


# ---------------------------------------------------------------------- standalone
def _init_process_group() -> torch.device:
    """A process group when started by a launcher (WORLD_SIZE > 1), else none; the device to use."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    from moca_fast.config import ConfigError
    from moca_fast.train.checkpoint import load_trained_model

    parser = argparse.ArgumentParser(prog="python -m moca_fast.eval.knn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's output folder (latest)")
    parser.add_argument("--data", help="folder with train/ and val/ class sub-folders")
    parser.add_argument("--train", help="k-NN bank folder (class sub-folders); overrides --data")
    parser.add_argument("--val", help="k-NN query folder (class sub-folders); overrides --data")
    parser.add_argument("--k", type=int, default=None, help="neighbours (default: the checkpoint's knn_k)")
    parser.add_argument("--temperature", type=float, default=None, help="vote temperature (default: knn_temperature)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        device = _init_process_group()
        model, cfg, folder = load_trained_model(args.checkpoint, device)
        train_root = args.train or (os.path.join(args.data, "train") if args.data else cfg.knn_train)
        val_root = args.val or (os.path.join(args.data, "val") if args.data else cfg.knn_val)
        if train_root is None or val_root is None:
            if cfg.data is not None:
                raise ConfigError("give --data DIR (with train/ and val/) or --train DIR --val DIR")
            from moca_fast.data.demo import prepare_demo

            demo = prepare_demo()
            train_root, val_root = train_root or demo.knn_train, val_root or demo.knn_val
        for name, root in (("train", train_root), ("val", val_root)):
            if not Path(root).is_dir():
                raise ConfigError(f"k-NN {name} folder {root} does not exist")
        if args.batch_size:
            cfg = cfg.replace(batch_size=args.batch_size)
        rank, world = rank_and_world()
        loaders = build_knn_loaders(cfg, train_root, val_root, rank, world, device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result = knn_accuracy(model, *loaders, k=args.k or cfg.knn_k,
                              temperature=args.temperature or cfg.knn_temperature, dtype=dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["checkpoint"] = str(folder)
    if rank == 0:
        print(json.dumps(result))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
