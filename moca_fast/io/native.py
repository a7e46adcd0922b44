"""Our own model file: the resolved config and the full state dict (student, teacher, codebook, heads).

{"format": FORMAT, "config": Config.to_dict(), "model": state_dict}; plain types only, so it loads with
torch.load(weights_only=True) and no allow-listed class.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moca_fast.config import load_config
from moca_fast.errors import CheckpointError
from moca_fast.io.official import read_checkpoint
from moca_fast.model.moca import MOCA
from moca_fast.output_files import atomic_file

FORMAT = "moca_fast.model/1"


def save_model(model: MOCA, path: str | Path) -> None:
    """Writes the model file atomically (nothing half-written is left if it fails)."""
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, "config": model.config.to_dict(), "model": model.state_dict()}, tmp)


def is_native(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT


def load_model(path: str | Path) -> MOCA:
    """Rebuilds the model a save_model file describes and loads its weights (strict)."""
    ckpt = read_checkpoint(path)
    if not is_native(ckpt):
        raise CheckpointError(f"{path}: not a moca_fast model file (no format {FORMAT!r})")
    model = MOCA(load_config(overrides=ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return model

