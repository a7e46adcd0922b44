"""Atomic, exactly-resumable checkpoints: writing them and loading them into the engine (finding, verifying and
reading them: moca_fast.io.checkpoints).

Layout under <output>/checkpoints/:
  step_00000100/deepspeed/...        DeepSpeed's files: the module state (student, teacher, codebook
                                     words/pointer/dist_norm, generator BatchNorm statistics) and each
                                     rank's ZeRO optimiser partition with its fp32 master weights and Adam
                                     moments (a resume on another number of ranks re-slices them from all the
                                     ranks' files: optimizer_state.py)
  step_00000100/trainer_rank00000.pt per rank: optimiser-step counter, data position (global), RNG states
  step_00000100/meta.json            step, epoch, world size, precision, the resolved config, and
                                     "files": each other file's size and CRC-32 (verified on resume)
  latest                             the name of the newest complete checkpoint
A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into place,
and only then is `latest` replaced (write + fsync + rename): a crash at any point leaves the previous
`latest` pointing to a complete checkpoint. All ranks write into the same folder, so multi-node runs
need a shared filesystem (as DeepSpeed's own checkpoints do).
CRC-32 (zlib) rather than SHA-256: it runs at ~2 GB/s against ~0.8 GB/s here, and it guards against
truncation and damage, not tampering (files load weights-only, see moca_fast/io/safe_load.py). Pruning renames a
folder to a hidden `.step_*.deleting` name before deleting it, so no half-deleted folder looks complete.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from moca_fast.distributed import rank_and_world
from moca_fast.errors import ConfigError
from moca_fast.io.checkpoints import (CHECKPOINTS, DEEPSPEED_TAG, LATEST, META, file_digests, last_complete, read_meta,
                                      verify_checkpoint)
from moca_fast.io.safe_load import install_weights_only_loading, safe_load
from moca_fast.output_files import atomic_file, fsync_path
from moca_fast.train.engine import barrier
from moca_fast.train.optimizer_state import load_full_state, read_full_state, refuse_round_robin, sliced_groups
from moca_fast.train.run_guard import DiskFullError, agree, disk_full, mount_point

log = logging.getLogger("moca_fast.train")


def capture_rng() -> dict:
    """Every generator's state as tensors and plain values (the trainer file loads weights-only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file, fsync and rename: a reader (or a resume after a stop in the
    middle) finds the old file or the new one, whole."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def trainer_file(folder: Path, rank: int) -> Path:
    return folder / f"trainer_rank{rank:05d}.pt"


def save_checkpoint(engine, output: str | os.PathLike, step: int, trainer_state: dict, meta: dict,
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(output) / CHECKPOINTS
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    rank = rank_and_world()[0]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    device = getattr(engine, "device", torch.device("cpu"))
    failure = _disk_full_during(root, lambda: (
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False),
        torch.save({**trainer_state, "rng": capture_rng()}, trainer_file(tmp, rank))))
    if agree(failure is None, device) and rank == 0:
        failure = _disk_full_during(root, lambda: _publish(root, tmp, final, name, {**meta, "step": step}, keep))
    if not agree(failure is None, device):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(f"no space left on {mount_point(root)} writing {final}; "
                            f"{last_complete(output)}")
    return final


def _disk_full_during(root: Path, write) -> BaseException | None:
    """Runs write(); a disk-full error is returned (so every rank can agree on it), others raise."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        if not disk_full(e, root):
            raise
        return e.with_traceback(None)  # its frames hold the half-written file open
    return None


def _publish(root: Path, tmp: Path, final: Path, name: str, meta: dict, keep: int) -> None:
    """Rank 0: meta.json with the file digests, fsync, rename into place, move `latest`, prune."""
    (tmp / META).write_text(json.dumps({**meta, "saved_at": time.time(), "files": file_digests(tmp)}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # a re-run of this very step: keep `latest` valid until the swap
        stale = root / f".{name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        shutil.rmtree(stale)
    os.rename(tmp, final)
    fsync_path(root)
    write_atomic(root / LATEST, name + "\n")
    _prune(root, keep, name)


def _prune(root: Path, keep: int, newest: str) -> None:
    """Deletes all but the `keep` newest checkpoints that verify (`newest`, just written, among them). A damaged
    one is neither counted nor deleted: resume skips it, so counting it could delete the last good one."""
    done = sorted(p for p in root.glob("step_*") if (p / META).is_file())
    good = [p for p in done if p.name == newest or verify_checkpoint(p) is None]
    for old in good[:-keep]:
        if old.name != newest:
            doomed = root / f".{old.name}.deleting"
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(engine, folder: Path, world_size: int) -> dict:
    """Collective. Loads module + optimiser into `engine`; returns this rank's trainer state (with "rng", to be
    restored by the caller right before training continues). On another number of ranks than the checkpoint's,
    the optimiser state is re-sliced from all the old ranks' optimiser files (read before DeepSpeed loads
    anything), and a rank the checkpoint did not have gets "rng": None (it keeps the generators the run seeded
    for it). An optimizer_full.pt written by earlier versions is not read."""
    written_by = read_meta(folder)["world_size"]
    rank = rank_and_world()[0]
    resliced = written_by != world_size and sliced_groups(engine) is not None
    if resliced:
        refuse_round_robin(engine, world_size, written_by)
    full_state = read_full_state(folder / DEEPSPEED_TAG, written_by) if resliced else None
    install_weights_only_loading(engine)
    loaded, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=not resliced,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint in {folder / DEEPSPEED_TAG}")
    if resliced:
        load_full_state(engine, full_state, folder / DEEPSPEED_TAG)
    if rank < written_by:
        return safe_load(trainer_file(folder, rank), map_location="cpu")
    return {**safe_load(trainer_file(folder, 0), map_location="cpu"), "rng": None}

