"""Semantic segmentation scores from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

confusion[t, p] counts the pixels of true class t predicted as p; pixels whose label is the ignore label
count nowhere. IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that is neither in the labels nor predicted
(union 0) has no IoU (None) and is left out of the mean, as mmsegmentation's nanmean does. Pixel accuracy is
trace / sum over the pixels that are not ignored.
"""
from __future__ import annotations

import numpy as np
import torch

from moca_fast.data.segmentation import IGNORE


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore: int = IGNORE) -> torch.Tensor:
    """pred, target: integer tensors of the same shape (any) -> [K, K] int64 counts (target rows, pred columns).
    Pixels with target == ignore are left out; a prediction outside 0..K-1 is an error (ValueError)."""
    keep = target != ignore
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1} that are not the ignore label {ignore}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"predictions outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor | np.ndarray, classes: list[str] | None = None) -> dict:
    """{"miou", "pixel_accuracy", "mean_accuracy" (percent), "iou": {class: percent or None}, "pixels"}."""
    conf = np.asarray(torch.as_tensor(confusion).cpu(), dtype=np.float64)
    names = classes or [str(c) for c in range(len(conf))]
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(1) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        recall = np.where(present, tp / conf.sum(1), np.nan)
    total = conf.sum()
    return {"miou": _percent(np.nanmean(iou)) if (union > 0).any() else None,
            "pixel_accuracy": _percent(tp.sum() / total) if total else None,
            "mean_accuracy": _percent(np.nanmean(recall)) if present.any() else None,
            "iou": {name: _percent(v) for name, v in zip(names, iou)},
            "pixels": int(total)}


def _percent(value) -> float | None:
    return None if np.isnan(value) else float(100.0 * value)
