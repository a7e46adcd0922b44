"""Atomic, exactly-resumable checkpoints.

Layout under <output>/checkpoints/:
  step_00000100/deepspeed/...        DeepSpeed's files: the module state (student, teacher, codebook
                                     words/pointer/dist_norm, generator BatchNorm statistics) and each
                                     rank's ZeRO optimiser partition with its fp32 master weights
  step_00000100/optimizer_full.pt    the whole fp32 master weights and Adam moments by parameter name, where
                                     the optimiser slices them per rank (ZeRO 1/2, bf16): a resume on another
                                     number of ranks re-slices them (optimizer_state.py)
  step_00000100/trainer_rank00000.pt per rank: optimiser-step counter, data position (global), RNG states
  step_00000100/meta.json            step, epoch, world size, precision, the resolved config, and
                                     "files": each other file's size and CRC-32 (verified on resume)
  latest                             the name of the newest complete checkpoint
A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into place,
and only then is `latest` replaced (write + fsync + rename): a crash at any point leaves the previous
`latest` pointing to a complete checkpoint. All ranks write into the same folder, so multi-node runs
need a shared filesystem (as DeepSpeed's own checkpoints do).
CRC-32 (zlib) rather than SHA-256: it runs at ~2 GB/s against ~0.8 GB/s here, and it guards against
truncation and damage, not tampering (files load weights-only, see safe_load.py). Pruning renames a
folder to a hidden `.step_*.deleting` name before deleting it, so no half-deleted folder looks complete.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from moca_fast.config import ConfigError
from moca_fast.distributed import on_rank0, rank_and_world
from moca_fast.output_files import atomic_file, fsync_path
from moca_fast.train.engine import barrier
from moca_fast.train.optimizer_state import FILE as OPTIMIZER_FULL
from moca_fast.train.optimizer_state import gather_full_state, load_full_state, sliced_groups
from moca_fast.train.run_guard import DiskFullError, agree, disk_full, mount_point
from moca_fast.train.safe_load import install_weights_only_loading, safe_load

log = logging.getLogger("moca_fast.train")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
DEEPSPEED_TAG = "deepspeed"
META = "meta.json"


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
    optimizer_full = gather_full_state(engine)  # a collective: before any rank may fail to write
    failure = _disk_full_during(root, lambda: (
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False),
        torch.save({**trainer_state, "rng": capture_rng()}, trainer_file(tmp, rank)),
        optimizer_full is not None and torch.save(optimizer_full, tmp / OPTIMIZER_FULL)))
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


def last_complete(output: str | os.PathLike) -> str:
    """"step N is the last complete checkpoint" (of <output>), for error messages."""
    done = [p for p in sorted((Path(output) / CHECKPOINTS).glob("step_*")) if (p / META).is_file()]
    if not done:
        return "no checkpoint is complete yet"
    return f"step {int(done[-1].name.split('_')[1])} is the last complete checkpoint"


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


_CHUNK = 16 << 20


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "crc32"}} of every file under `folder` but meta.json."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != META:
            found[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    return found


def verify_checkpoint(folder: Path) -> str | None:
    """None if every file meta.json lists is there with its size and CRC-32; else why not (one phrase)."""
    try:
        files = read_meta(folder)["files"]
    except FileNotFoundError:
        return f"{META} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{META} is unreadable or lists no files"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if _crc32(path) != want["crc32"]:
            return f"{name} fails its CRC-32 check"
    return None


def verified_or_refused(folder: Path, flag: str) -> Path:
    problem = verify_checkpoint(folder)
    if problem is not None:
        raise ConfigError(f"{flag} {folder}: damaged checkpoint ({problem})")
    return folder


def newest_verified_checkpoint(output: str | os.PathLike) -> Path | None:
    """The newest checkpoint of <output> that verifies, starting at `latest`; each one skipped is
    logged with its reason. None if <output> has none; ConfigError if it has some and none verifies."""
    root = Path(output) / CHECKPOINTS
    complete = sorted((p for p in root.glob("step_*") if (p / META).is_file()), reverse=True)
    if not complete:
        return None
    skipped = []
    for folder in complete:
        problem = verify_checkpoint(folder)
        if problem is None:
            if skipped:
                log.warning("resuming from %s, the newest checkpoint that verifies", folder.name)
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
        skipped.append(f"{folder.name} ({problem})")
    raise ConfigError(f"{root}: no checkpoint verifies: {'; '.join(skipped)}")


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The checkpoint folder `latest` names under <output>/checkpoints, or None if there is none."""
    root = Path(output) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / META).is_file():
        raise ConfigError(f"{pointer} names {folder.name}, which is not a complete checkpoint")
    return folder


def resolve_resume(resume: str | None, output: str | os.PathLike, flag: str = "--resume") -> Path | None:
    """None: start fresh (refused if <output> already has checkpoints); "auto": the latest
    checkpoint of <output> if any; else a checkpoint folder, or an output folder (its latest).
    Decided on rank 0, which reads and checksums the files, and shared with every rank."""
    return on_rank0(lambda: _resolve_resume(resume, output, flag))


def _resolve_resume(resume: str | None, output: str | os.PathLike, flag: str) -> Path | None:
    if resume is None:
        existing = latest_checkpoint(output)
        if existing is not None:
            raise ConfigError(f"{output} already holds checkpoints (latest: {existing.name}); pass --resume auto "
                              f"to continue that run or choose another --output")
        return None
    if resume == "auto":
        return newest_verified_checkpoint(output)
    path = Path(resume)
    if (path / META).is_file():
        return verified_or_refused(path, flag)
    if (path / CHECKPOINTS / LATEST).is_file():
        return verified_or_refused(latest_checkpoint(path), flag)
    if (path / LATEST).is_file():
        return verified_or_refused(latest_checkpoint(path.parent), flag)
    raise ConfigError(f"{flag} {resume}: not a checkpoint folder (no {META}) nor a run folder with "
                      f"{CHECKPOINTS}/{LATEST}")


def read_meta(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / META).read_text())


def load_checkpoint(engine, folder: Path, world_size: int) -> dict:
    """Collective. Loads module + optimiser into `engine`; returns this rank's trainer state (with "rng", to be
    restored by the caller right before training continues). On another number of ranks than the checkpoint's,
    the optimiser state is re-sliced from optimizer_full.pt, and a rank the checkpoint did not have gets
    "rng": None (it keeps the generators the run seeded for it)."""
    written_by = read_meta(folder)["world_size"]
    rank = rank_and_world()[0]
    resliced = written_by != world_size and sliced_groups(engine) is not None
    if resliced and not (folder / OPTIMIZER_FULL).is_file():
        raise ConfigError(f"checkpoint {folder} was written by {written_by} ranks, this run has {world_size}, and it "
                          f"holds no {OPTIMIZER_FULL} (written by an older moca_fast): resume it on {written_by} ranks")
    install_weights_only_loading(engine)
    loaded, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=not resliced,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint in {folder / DEEPSPEED_TAG}")
    if resliced:
        load_full_state(engine, safe_load(folder / OPTIMIZER_FULL, map_location="cpu"), folder / OPTIMIZER_FULL)
    if rank < written_by:
        return safe_load(trainer_file(folder, rank), map_location="cpu")
    return {**safe_load(trainer_file(folder, 0), map_location="cpu"), "rng": None}


def load_model_state(folder: str | os.PathLike) -> dict:
    """The MOCA module state dict of a checkpoint folder (no engine needed), on the CPU."""
    files = sorted((Path(folder) / DEEPSPEED_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"{folder} holds no DeepSpeed model state ({DEEPSPEED_TAG}/mp_rank_00_model_states.pt)")
    return safe_load(files[0], map_location="cpu")["module"]


def load_trained_model(checkpoint: str, device: torch.device | str = "cpu"):
    """(MOCA with the checkpoint's config and weights in fp32, its config, the checkpoint folder) of a
    checkpoint folder, or of a run folder's latest checkpoint."""
    from moca_fast.config import Config, apply_overrides
    from moca_fast.model.moca import MOCA

    folder = resolve_resume(checkpoint, checkpoint, flag="--checkpoint")
    if folder is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no checkpoint found")
    meta = read_meta(folder)
    cfg = apply_overrides(Config(), meta["config"])
    model = MOCA(cfg, meta["world_size"])
    model.load_state_dict(load_model_state(folder))
    return model.to(device).float(), cfg, folder
