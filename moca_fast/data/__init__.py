"""Data layer: image folder -> two augmented views per image on the device; eval batches for k-NN.

Backends (cfg.data_backend): "dali" (GPU decode, moca_fast.data.dali), "torch" (DataLoader + PIL),
"synthetic" (random tensors, benchmarks), "auto" (DALI on a CUDA device when it imports, else torch).
Every train loader follows the TwoViewLoader protocol below; cfg.data=None means the demo set.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Protocol

import torch

from moca_fast.data.image_list import ImageList
from moca_fast.data.scan import scan_images
from moca_fast.errors import ConfigError

log = logging.getLogger("moca_fast.data")

__all__ = ["TwoViewLoader", "ImageList", "scan_images", "build_train_loader", "build_eval_loader",
           "select_backend", "scan_on_rank0"]


class TwoViewLoader(Protocol):
    """Iterating yields (x1, x2): float32 [B, 3, H, W] on the device, ImageNet-normalised, two views
    of the same B images; len = steps per epoch; see sharding.LoaderPosition for epoch/step."""

    backend: str
    num_images: int
    skipped: list[tuple[str, str]]
    identity: dict  # what identifies the data (moca_fast.data.fingerprint), set by build_train_loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


_logged_choices: set[tuple[str, str]] = set()


def _dali_missing(device: torch.device) -> str | None:
    """Why the DALI backend cannot be used here, or None when it can."""
    if device.type != "cuda":
        return f"device is {device.type}, DALI decodes on a CUDA device"
    try:
        import nvidia.dali  # noqa: F401
        import moca_fast.data.dali  # noqa: F401
    except ImportError as e:
        return f"DALI does not import ({e})"
    return None


def select_backend(requested: str, device, rank: int = 0) -> str:
    """Resolves data_backend "auto" to "dali" or "torch"; logs the choice once per process."""
    device = torch.device(device)
    if requested not in ("auto", "dali", "torch", "synthetic"):
        raise ConfigError(f"data_backend={requested!r} must be one of auto, dali, torch, synthetic")
    why_not_dali = _dali_missing(device) if requested == "auto" else None
    choice = "torch" if why_not_dali else ("dali" if requested == "auto" else requested)
    if requested == "dali":
        try:
            import moca_fast.data.dali  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"data_backend=dali but DALI does not import ({e}); use data_backend=torch") from None
    if rank == 0 and (requested, choice) not in _logged_choices:
        _logged_choices.add((requested, choice))
        note = f" (auto; not DALI: {why_not_dali})" if why_not_dali else (" (auto)" if requested == "auto" else "")
        log.info("data backend: %s%s", choice, note)
    return choice


def scan_on_rank0(root: str, bad_files: str) -> ImageList:
    """scan_images on rank 0 (on all the node's cores), broadcast to all ranks (so all shard the same list);
    local when not distributed. The other ranks wait on rank 0's heartbeat, never on a collective timeout."""
    from moca_fast.distributed import on_rank0

    return on_rank0(lambda: scan_images(root, bad_files))


def data_root(cfg) -> str:
    """cfg.data, or the demo training folder when cfg.data is None."""
    if cfg.data is not None:
        return os.fspath(cfg.data)
    from moca_fast.data.demo import prepare_demo

    return prepare_demo().train


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, device="cpu") -> TwoViewLoader:
    """The two-view training loader of cfg.data_backend for this rank (see the module docstring), with the
    identity of its data (computed on rank 0)."""
    from moca_fast.data.fingerprint import image_list_identity, synthetic_identity
    from moca_fast.distributed import on_rank0

    device = torch.device(device)
    cfg.validate_data()
    backend = select_backend(cfg.data_backend, device, rank)
    if backend == "synthetic":
        from moca_fast.data.synthetic import SyntheticTwoViewLoader

        loader = SyntheticTwoViewLoader(cfg, rank, world_size, device)
        loader.identity = synthetic_identity(loader.num_images)
        return loader
    images = scan_on_rank0(data_root(cfg), cfg.bad_files)
    identity = on_rank0(lambda: image_list_identity(images))
    loader = _image_loader(backend, images, cfg, rank, world_size, device)
    loader.identity = identity
    return loader


def _image_loader(backend: str, images: ImageList, cfg, rank: int, world_size: int, device) -> TwoViewLoader:
    if backend == "dali":
        from moca_fast.data.dali import DaliTwoViewLoader

        try:
            return DaliTwoViewLoader(images, cfg, rank, world_size, device)
        except RuntimeError as e:
            if cfg.data_backend == "dali":
                raise
            # "auto" must not fail where the torch backend works
            log.warning("DALI pipeline failed to start (%s); data backend: torch", str(e).splitlines()[0])
    from moca_fast.data.torch_backend import TorchTwoViewLoader

    return TorchTwoViewLoader(images, cfg, rank, world_size, device)


def build_eval_loader(root_or_imagelist, cfg, rank: int = 0, world_size: int = 1, device="cpu",
                      batch_size: int | None = None):
    """Loader of (images [B, 3, S, S], labels [B], indices [B]) over this rank's share, nothing dropped."""
    from moca_fast.data.torch_backend import TorchEvalLoader

    images = root_or_imagelist
    if not isinstance(images, ImageList):
        images = scan_on_rank0(os.fspath(root_or_imagelist), cfg.bad_files)
    return TorchEvalLoader(images, cfg, rank, world_size, device, batch_size)
