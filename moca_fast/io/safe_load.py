"""Loading checkpoint files without executing code: torch.load(weights_only=True) with the exact
allow-list our files need.

Our trainer files hold plain values and tensors only (the RNG states are stored as tensors, see
checkpoint.capture_rng); DeepSpeed's ZeRO optimiser files hold three DeepSpeed classes besides
(ZeroStageEnum, fragment_address, LossScaler), which are allowed for those files and nothing else.
DeepSpeed's own loads go through `WeightsOnlyCheckpointEngine`, installed on the engine before it
loads. A refused or unreadable file is a `CheckpointLoadError`: one line naming the file and the type.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from moca_fast.errors import ConfigError


class CheckpointLoadError(ConfigError):
    """A checkpoint file that cannot be loaded safely; the message is one line naming the file."""


def deepspeed_globals() -> list:
    """The classes DeepSpeed's optimiser files pickle (fp32 and bf16, ZeRO stages 0-2)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \S+|Trying to \S+ [^.]+")


def _refused_type(path: Path, error: Exception) -> str:
    match = _UNSUPPORTED.search(str(error))
    if match:
        return match.group(1) or match.group(0)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if found:
            return ", ".join(found)
    except Exception:  # not a zip-format file: the unpickler's message is all there is
        pass
    return str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__


def safe_load(path: str | os.PathLike, map_location=None, allowed: list | tuple = (), mmap: bool = False) -> object:
    """torch.load(path, weights_only=True) allowing only `allowed` besides tensors and plain values; mmap: its
    tensors read from the file when used (torch.load's mmap)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointLoadError(f"{path}: refused to load {_refused_type(path, e)} (checkpoint files may hold "
                                  f"only tensors and plain values; loading it could run code)") from None
    except FileNotFoundError:
        raise CheckpointLoadError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointLoadError(f"{path}: unreadable ({first})") from None


class WeightsOnlyCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine: saves and everything else are the wrapped engine's;
    loads are weights-only with DeepSpeed's allow-list."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_load(path, map_location, deepspeed_globals())


def install_weights_only_loading(engine) -> None:
    """Makes every checkpoint load of a DeepSpeed engine weights-only (idempotent)."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
