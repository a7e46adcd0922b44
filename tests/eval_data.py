"""Test helpers of the evaluation protocols: a tiny trained-looking run folder, real JPEG class folders, and a
plain-Python k-NN oracle."""
import math
from pathlib import Path

import torch

from jpeg_folder import write_class_folders, write_run_folder
from moca_fast import build_model
from moca_fast.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3


def tiny_cfg():
    return load_config("tiny", overrides=dict(batch_size=4, num_workers=0))


def tiny_model(seed: int = 0):
    """The tiny preset with a teacher unlike its student (so tests see the teacher is what is evaluated)."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_eval_data(root: Path, per_class_train: int = 6, per_class_val: int = 3) -> Path:
    """root/{train,val}/c<k>/<i>.jpg for CLASSES classes."""
    write_class_folders(root / "train", per_class=per_class_train, classes=CLASSES, seed=1)
    write_class_folders(root / "val", per_class=per_class_val, classes=CLASSES, seed=2)
    return root


def make_run(root: Path, model=None) -> Path:
    return write_run_folder(root, model or tiny_model(), tiny_cfg())


def knn_oracle(bank, labels, queries, query_labels, k, T, num_classes):
    """Per query: the k most similar bank rows, votes sum exp(sim / T) per class (plain Python)."""
    c1 = c5 = 0
    for q, y in zip(queries, query_labels):
        sims = [(float(q @ b), int(l)) for b, l in zip(bank, labels)]
        votes = [0.0] * num_classes
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(sim / T)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        c1 += ranked[0] == int(y)
        c5 += int(y) in ranked[:5]
    return c1, c5
