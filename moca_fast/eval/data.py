"""The labelled folders of an evaluation: checks, augmented training loaders, and one-pass feature extraction.

--data DIR holds train/ and val/ with one sub-folder per class (or --train / --val name them); `--data demo`
is the embedded MNIST demo set. Every class of val/ must exist in train/ (val labels are train/'s class
indices); no class folder may be empty. Over ranks, each rank reads images rank, rank + world, ... and the
features are gathered by index, so every rank holds all of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from moca_fast.config import Config
from moca_fast.data import scan_on_rank0
from moca_fast.data.scan import ImageList, open_rgb
from moca_fast.distributed import rank_and_world
from moca_fast.errors import ConfigError


@dataclass
class Splits:
    train: ImageList
    val: ImageList

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def split_roots(data: str | None, train: str | None, val: str | None, cfg: Config) -> tuple[str, str]:
    """(train folder, val folder) from --data / --train / --val; the demo set for `--data demo` or for a
    demo-trained checkpoint given no folder."""
    if data == "demo" or (data is None and not (train and val) and cfg.data is None):
        from moca_fast.data.demo import prepare_demo

        demo = prepare_demo()
        data = str(Path(demo.knn_train).parent)
    if data is None and not (train and val):
        raise ConfigError("give --data DIR (with train/ and val/ class folders) or --train DIR --val DIR")
    roots = []
    for name, given in (("train", train), ("val", val)):
        root = given or os.path.join(data, name)
        if not os.path.isdir(root):
            flag = f"--{name}" if given else "--data"
            raise ConfigError(f"{flag}: the {name} folder {root} does not exist")
        roots.append(root)
    return roots[0], roots[1]


def _scan_classes(root: str, cfg: Config) -> ImageList:
    images = scan_on_rank0(root, cfg.bad_files)
    if not any(e.is_dir() for e in os.scandir(images.root) if not e.name.startswith(".")):
        raise ConfigError(f"{images.root} has no class sub-folders (one folder per class is needed)")
    counts = torch.bincount(torch.tensor(images.labels), minlength=len(images.classes))
    empty = [c for c, n in zip(images.classes, counts.tolist()) if n == 0]
    if empty:
        raise ConfigError(f"class folder {os.path.join(images.root, empty[0])} holds no usable image "
                          f"({len(empty)} empty class folders in {images.root})")
    return images


def load_splits(train_root: str, val_root: str, cfg: Config) -> Splits:
    """Scans both folders; val labels re-indexed to train/'s classes."""
    train, val = _scan_classes(train_root, cfg), _scan_classes(val_root, cfg)
    if len(train.classes) < 2:  # every classifier would be right on every image
        raise ConfigError(f"{train.root} has a single class folder ({train.classes[0]}); an evaluation needs at "
                          f"least 2 classes")
    index = {c: i for i, c in enumerate(train.classes)}
    missing = [c for c in val.classes if c not in index]
    if missing:
        raise ConfigError(f"class {missing[0]!r} of {val.root} has no folder in {train.root} "
                          f"({len(missing)} val classes missing from train)")
    labels = [index[val.classes[label]] for label in val.labels]
    return Splits(train, replace(val, labels=labels, classes=list(train.classes)))


# ---------------------------------------------------------------------- augmented training data
class _Labelled(Dataset):
    def __init__(self, images: ImageList, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(self.images.files[i])), self.images.labels[i]


def train_loader(images: ImageList, transform, batch_size: int, num_workers: int, seed: int, device) -> DataLoader:
    """Shuffled (seeded, per epoch: call loader.sampler.set_epoch), this rank's share, incomplete batch dropped."""
    rank, world_size = rank_and_world()
    sampler = DistributedSampler(_Labelled(images, transform), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    if len(sampler) < batch_size:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {len(sampler)} training images per rank "
                          f"({len(images)} in {images.root})")
    return DataLoader(sampler.dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=num_workers > 0)
