"""Reading a training run's checkpoints (written by moca_fast.train.checkpoint, whose docstring has the layout):
finding the latest one of a run folder, verifying each file's size and CRC-32 against meta.json, reading the
metadata and the model's weights (weights-only), and the trained model itself for evaluations and exports."""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import torch

from moca_fast.config import Config
from moca_fast.config_parse import apply_overrides
from moca_fast.distributed import on_rank0
from moca_fast.errors import ConfigError
from moca_fast.io.safe_load import safe_load
from moca_fast.model.moca import MOCA

log = logging.getLogger("moca_fast.train")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
DEEPSPEED_TAG = "deepspeed"
META = "meta.json"


def last_complete(output: str | os.PathLike) -> str:
    """"step N is the last complete checkpoint" (of <output>), for error messages."""
    done = [p for p in sorted((Path(output) / CHECKPOINTS).glob("step_*")) if (p / META).is_file()]
    if not done:
        return "no checkpoint is complete yet"
    return f"step {int(done[-1].name.split('_')[1])} is the last complete checkpoint"


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


def load_model_state(folder: str | os.PathLike) -> dict:
    """The MOCA module state dict of a checkpoint folder (no engine needed), on the CPU."""
    files = sorted((Path(folder) / DEEPSPEED_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"{folder} holds no DeepSpeed model state ({DEEPSPEED_TAG}/mp_rank_00_model_states.pt)")
    return safe_load(files[0], map_location="cpu")["module"]


def load_trained_model(checkpoint: str, device: torch.device | str = "cpu"):
    """(MOCA with the checkpoint's config and weights in fp32, its config, the checkpoint folder) of a
    checkpoint folder, or of a run folder's latest checkpoint."""
    folder = resolve_resume(checkpoint, checkpoint, flag="--checkpoint")
    if folder is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no checkpoint found")
    meta = read_meta(folder)
    cfg = apply_overrides(Config(), meta["config"])
    model = MOCA(cfg, meta["world_size"])
    model.load_state_dict(load_model_state(folder))
    return model.to(device).float(), cfg, folder
