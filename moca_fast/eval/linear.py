"""Linear probing of the frozen teacher (official eval_linear.py recipe).

Features: [CLS] ‖ [AVG] of the teacher's final (LayerNorm'ed) tokens (--features cls_avg, the default) or
[AVG] alone; no further normalisation. One linear head per learning rate of the official sweep
(lr ∈ {1..9} x 10^{-4..0}, scaled by batch x world / 256), all trained at once on the same features:
SGD momentum 0.9, weight decay 0, cosine to 0 over --epochs (stepped per epoch), heads initialised
N(0, 0.01) with zero bias, cross-entropy. Training images: RandomResizedCrop + horizontal flip, a fresh
teacher forward every epoch; with --cached the features of the centre-cropped training images are
extracted once and reused every epoch (no augmentation; a quick check). The validation features are
extracted once. The reported top-1 is the best head at its best epoch (as the official script).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

from moca_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moca_fast.errors import ConfigError
from moca_fast.eval import cli
from moca_fast.eval.data import train_loader
from moca_fast.io.teacher import TeacherTokens
from moca_fast.probes.features import extract

#: the official sweep: n x 10^e for e in -4..0, n in 1..9
LEARNING_RATES = tuple(float(f"{n}e{e}") for e in range(-4, 1) for n in range(1, 10))
MOMENTUM = 0.9
INIT_STD = 0.01
FEATURES = {
    "cls_avg": lambda pre, normed: torch.cat([normed[:, 0], normed[:, 1:].mean(dim=1)], dim=1),
    "avg": lambda pre, normed: normed[:, 1:].mean(dim=1),
}


class LinearHeads(nn.Module):
    """H independent linear classifiers of the same features: x [B, D] -> logits [H, B, N]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        self.weight = nn.ParameterList([nn.Parameter(torch.randn(num_classes, dim) * INIT_STD)
                                        for _ in range(num_heads)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = torch.stack(list(self.weight)), torch.stack(list(self.bias))
        return torch.einsum("bd,hnd->hbn", x, weight) + bias[:, None, :]


def heads_optimizer(heads: LinearHeads, lrs, epochs: int):
    """One SGD parameter group per head (its own lr), and the per-epoch cosine schedule."""
    groups = [{"params": [w, b], "lr": lr} for w, b, lr in zip(heads.weight, heads.bias, lrs)]
    optimizer = torch.optim.SGD(groups, lr=lrs[0], momentum=MOMENTUM, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)


def train_step(model: nn.Module, optimizer, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One step of every head; returns the per-head losses [H]. The summed loss gives each head exactly
    the gradient of its own mean cross-entropy."""
    logits = model(feats)
    losses = torch.stack([F.cross_entropy(head, labels) for head in logits])
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


@torch.no_grad()
def head_accuracy(heads: nn.Module, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Correct (top-1, top-5) counts per head: [H, 2]."""
    counts = None
    for start in range(0, feats.shape[0], chunk):
        logits = heads(feats[start:start + chunk])
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[start:start + chunk][None, :, None]
        batch = torch.stack([top[..., 0].sum(1), top.any(-1).sum(1)], dim=1)
        counts = batch if counts is None else counts + batch
    return counts


def cached_batches(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch: int, seed: int,
                   rank: int = 0, world_size: int = 1):
    """Epoch `epoch` of precomputed features: permutation randperm(N, seed + epoch), this rank's
    interleaved share, full batches only."""
    order = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
    mine = order[rank::world_size].to(feats.device)
    for start in range(0, len(mine) - batch_size + 1, batch_size):
        idx = mine[start:start + batch_size]
        yield feats[idx], labels[idx]


def _augmented_batches(loader, tokens, feature, device, epoch: int):
    loader.sampler.set_epoch(epoch)
    for images, labels in loader:
        pre, normed = tokens(images.to(device, non_blocking=True))
        yield feature(pre, normed), labels.to(device, non_blocking=True)


def _evaluate(argv):
    p = cli.parser("linear", __doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--features", choices=sorted(FEATURES), default="cls_avg")
    p.add_argument("--lr", type=float, nargs="+", default=list(LEARNING_RATES), help="base lrs (one head each)")
    p.add_argument("--cached", action="store_true", help="train on precomputed centre-crop features")
    p.add_argument("--val-every", type=int, default=1, help="epochs between validations (and the last one)")
    args = p.parse_args(argv)
    cli.positive("--epochs", args.epochs)
    cli.positive("--val-every", args.val_every)
    s = cli.Session(args, default_batch=128)
    torch.manual_seed(args.seed + s.rank)
    tokens, feature = TeacherTokens(s.teacher.encoder), FEATURES[args.features]
    kind = {args.features: feature}
    val, val_labels = extract(tokens, s.splits.val, s.cfg, s.device, s.batch_size, "linear val features", kind)
    val = val[args.features]
    scale = s.batch_size * s.world_size / 256
    torch.manual_seed(args.seed)  # the same initial heads on every rank
    heads = LinearHeads(val.shape[1], len(s.splits.classes), len(args.lr)).to(s.device)
    model = nn.parallel.DistributedDataParallel(heads) if s.world_size > 1 else heads
    optimizer, schedule = heads_optimizer(heads, [lr * scale for lr in args.lr], args.epochs)
    if args.cached:
        train, train_labels = extract(tokens, s.splits.train, s.cfg, s.device, s.batch_size,
                                      "linear train features", kind)
        train = train[args.features]
        if len(train) // s.world_size < s.batch_size:
            raise ConfigError(f"--batch-size {s.batch_size} exceeds the {len(train) // s.world_size} "
                                  f"training images per rank")
        batches = lambda epoch: cached_batches(train, train_labels, s.batch_size, epoch, args.seed, s.rank,
                                               s.world_size)
    else:
        transform = T.Compose([T.RandomResizedCrop(s.cfg.img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        loader = train_loader(s.splits.train, transform, s.batch_size, s.cfg.num_workers, args.seed, s.device)
        batches = lambda epoch: _augmented_batches(loader, tokens, feature, s.device, epoch)
    history, best = [], {"top1": -1.0}
    for epoch in range(args.epochs):
        losses = []
        for feats, labels in tqdm(batches(epoch), desc=f"linear epoch {epoch + 1}/{args.epochs}",
                                  disable=not s.is_main, unit="batch", leave=False):
            losses.append(train_step(model, optimizer, feats, labels))
        schedule.step()
        if (epoch + 1) % args.val_every and epoch + 1 != args.epochs:
            continue
        acc = 100.0 * head_accuracy(heads, val, val_labels).double().cpu() / len(val)
        h = int(acc[:, 0].argmax())
        mean_loss = torch.stack(losses).mean(0) if losses else torch.full((len(args.lr),), math.nan)
        if s.world_size > 1:
            dist.all_reduce(mean_loss.div_(s.world_size))
        history.append({"epoch": epoch + 1, "top1": acc[:, 0].tolist(), "top5": acc[:, 1].tolist(),
                        "train_loss": mean_loss.tolist()})
        if acc[h, 0] > best["top1"]:
            best = {"top1": float(acc[h, 0]), "top5": float(acc[h, 1]), "lr": args.lr[h], "epoch": epoch + 1}
    final = history[-1]
    result = {"top1": best["top1"], "top5": best["top5"], "best": best, "features": args.features,
              "cached": args.cached, "epochs": args.epochs, "batch_size": s.batch_size * s.world_size,
              "lrs": args.lr, "lr_scale": scale, "final_top1": final["top1"], "final_top5": final["top5"],
              "history": history, "train_images": len(s.splits.train), "val_images": len(val),
              "checkpoint": s.teacher.source}
    summary = (f"linear probe ({args.features}{', cached' if args.cached else ''}): top-1 {best['top1']:.2f} % "
               f"(top-5 {best['top5']:.2f} %) at lr {best['lr']:g} (x{scale:g}), epoch {best['epoch']}/"
               f"{args.epochs}, best of {len(args.lr)} heads")
    return cli.output_of(args, s), result, summary


def main(argv: list[str] | None = None) -> int:
    return cli.run("linear", _evaluate, argv)
