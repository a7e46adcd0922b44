"""TensorBoard's writer, shared by the trainer's scalars (moca_fast.train.run_log) and its figures (training)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("moca_fast.train")


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log.info("tensorboard not installed (%s): no TensorBoard scalars", e)
        return None
    return SummaryWriter(log_dir=str(folder))
