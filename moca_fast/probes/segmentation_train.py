"""Training and scoring a segmentation probe (moca_fast.probes.segmentation_head) over one or more ranks.

Training: SGD momentum 0.9, weight decay 0, lr x (1 - it / iters)^0.9 per iteration (Segmenter's poly
schedule), cross-entropy over the pixels whose label is not IGNORE, on logits upsampled to the crop. With
layer_decay (fine-tuning) the encoder's parameters get timm's layer-wise lr scales (param_groups_layer_decay).
Scoring: every validation image by sliding windows (the window is the encoder's input size), logits upsampled
bilinearly to the label's resolution, argmax, one confusion matrix summed over ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from moca_fast.distributed import rank_and_world
from moca_fast.probes.segmentation_head import SegmentationProbe, slide_inference
from moca_fast.probes.segmentation_metrics import IGNORE, confusion_matrix

log = logging.getLogger("moca_fast.probes")

MOMENTUM = 0.9
POLY_POWER = 0.9


def poly_lr(base: float, iteration: int, iters: int) -> float:
    return base * (1.0 - iteration / iters) ** POLY_POWER


def encoder_groups(probe: SegmentationProbe, layer_decay: float | None) -> list[dict]:
    """Parameter groups: the head alone (frozen encoder), or every parameter with timm's layer-decay scales."""
    if layer_decay is None:
        return [{"params": list(probe.head.parameters()), "lr_scale": 1.0}]
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(_Grouped(probe), weight_decay=0.0, layer_decay=layer_decay)


class _Grouped(nn.Module):
    """The probe with timm's ViT group_matcher, so timm's layer-decay groups apply to our encoder's names."""

    def __init__(self, probe: SegmentationProbe):
        super().__init__()
        self.probe = probe

    def group_matcher(self, coarse: bool = False) -> dict:
        e = r"^probe\.features\.encoder\."
        return {"stem": e + r"(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(e + r"blocks\.(\d+)", None), (e + r"norm", (99999,))]}


@dataclass
class Problems:
    """Validation or training samples whose masks were partly or wholly ignored: index -> why."""

    found: dict[int, str] = field(default_factory=dict)

    def add(self, index: int, problem: str) -> None:
        if problem:
            self.found[int(index)] = problem


def train_probe(probe: SegmentationProbe, batches, iters: int, batch_size: int, lr: float,
                layer_decay: float | None, device, from_features: bool = False,
                desc: str = "segmentation probe") -> list[float]:
    """Trains `probe` for `iters` iterations of `batches` (an endless iterator of (x, labels [B, w, w]) with
    B = batch_size per rank; x is images [B, 3, w, w], or patch features [B, D, g, g] when from_features).
    Returns the loss every iteration (this rank's). Several ranks: DistributedDataParallel over what is
    trained. The progress line counts crops of all ranks (img/s, time left)."""
    rank, world = rank_and_world()
    groups = encoder_groups(probe, layer_decay)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=0.0)
    trained = probe.head if layer_decay is None else probe
    trained.train()
    if layer_decay is None:
        probe.features.eval()
    step = _forward_fn(probe, from_features)
    model = nn.parallel.DistributedDataParallel(_Step(step, trained)) if world > 1 else _Step(step, trained)
    losses = []
    bar = tqdm(total=iters * batch_size * world, desc=desc, unit="img", disable=rank != 0, leave=False)
    for it in range(iters):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(lr, it, iters) * group.get("lr_scale", 1.0)
        logits = model(x, y.shape[-2:])
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(len(x) * world)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    probe.eval()
    return losses


class _Step(nn.Module):
    """Holds what is trained (for DDP's parameter list) and calls the probe's forward."""

    def __init__(self, step, trained: nn.Module):
        super().__init__()
        self.trained, self.step = trained, step

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.step(x, size)


def _forward_fn(probe: SegmentationProbe, from_features: bool):
    if from_features:
        return lambda feats, size: probe.head(feats, size)
    return lambda images, size: probe(images)


@torch.no_grad()
def score_probe(probe: SegmentationProbe, loader, window: int, stride: int, num_classes: int, device,
                keep_examples: int = 0, desc: str = "segmentation val") -> tuple[torch.Tensor, Problems, list]:
    """(confusion [K, K] summed over ranks, this rank's mask problems, up to keep_examples examples of this
    rank: (index, prediction uint8 [H, W])). `loader` yields (image [1, 3, h, w], labels [1, H, W], index,
    problem) for this rank's share."""
    rank, world = rank_and_world()
    probe.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    problems, examples = Problems(), []
    for image, labels, index, problem in tqdm(loader, desc=desc, unit="img", disable=rank != 0, leave=False):
        logits = slide_inference(probe, image.to(device), window, stride, num_classes)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        conf += confusion_matrix(pred, labels.to(device), num_classes)
        problems.add(index, problem)
        if len(examples) < keep_examples:
            examples.append((int(index), pred[0].to(torch.uint8).cpu()))
    if world > 1:
        dist.all_reduce(conf)
    return conf, problems, examples
