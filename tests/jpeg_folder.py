"""Test helpers: small real JPEG folders (class sub-folders, ImageNet layout), batch comparisons, and a
training-run folder holding one checkpoint in launch/train.py's layout."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_class_folders(root, per_class: int, classes: int = 2, seed: int = 0) -> Path:
    """root/c<k>/<i>.jpg, RGB noise of varied sizes, class k tinted by channel k (so classes differ)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for k in range(classes):
        folder = root / f"c{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 128, size=(40 + 3 * i, 48, 3), dtype=np.uint8)
            pixels[..., k % 3] += 127
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All (x1, x2) batches of one pass, cloned."""
    return [(a.clone(), b.clone()) for a, b in loader]


def assert_same_batches(xs, ys) -> None:
    assert len(xs) == len(ys)
    for (a1, b1), (a2, b2) in zip(xs, ys):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def write_run_folder(root, model, cfg, step: int = 1) -> Path:
    """root/checkpoints/{step_N/{deepspeed/mp_rank_00_model_states.pt, meta.json}, latest}: the files the
    model loaders read (no optimiser state)."""
    root = Path(root)
    folder = root / "checkpoints" / f"step_{step:08d}"
    (folder / "deepspeed").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, folder / "deepspeed" / "mp_rank_00_model_states.pt")
    from moca_fast.io.checkpoints import file_digests

    (folder / "meta.json").write_text(json.dumps({"world_size": 1, "step": step, "config": cfg.to_dict(),
                                                  "files": file_digests(folder)}))
    (root / "checkpoints" / "latest").write_text(f"{folder.name}\n")
    return root
