"""torch DataLoader + PIL backend: two augmented views for training, plain views for k-NN eval.

Workers decode with PIL and return uint8 views; the main process moves them to the device and
normalises there (4x less inter-process and host-to-device traffic than float32). Where the photometric
operations run is cfg.photometric_on: "workers" (the PIL path, torchvision's operations on each image), "device"
(the split path: the workers decode, crop, resize and flip, moca_fast.data.split_views, and the colour
operations run batched on the loader's device, moca_fast.data.photometric) or "auto" (the device when it is a
GPU; on the CPU the workers, which spread them over their processes). A file that
became unreadable since the scan is replaced by the next readable file of the list (a fixed
choice, so resumed runs see the same data); the main process logs and counts it.

Memory: the workers read the paths from the ImageList's byte buffer (moca_fast.data.image_list), so
their memory stays flat over epochs instead of copying the parent's path strings page by page.
Lifetime: workers ignore SIGTERM / SIGINT sent to the process group (the rank saves its checkpoint
first), die with their parent (PR_SET_PDEATHSIG), and are shut down at interpreter exit before
multiprocessing's own exit handler, which would otherwise wait forever on workers that ignore its
SIGTERM (a script that still holds a loader at exit).
"""
from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import signal
import weakref

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from moca_fast.data.image_list import ImageList
from moca_fast.data.photometric import Photometric
from moca_fast.data.scan import open_rgb, printable
from moca_fast.data.scan_pool import die_with_parent
from moca_fast.data.sharding import EpochShard, LoaderPosition, sample_rng
from moca_fast.data.split_views import CropFlipTwoViews
from moca_fast.data.transforms import EvalTransform, Normalizer, TwoViewTransform
from moca_fast.ending import STOP_SIGNALS

log = logging.getLogger("moca_fast.data")

MAX_SUBSTITUTES = 16


def load_or_substitute(files, index: int, read=None):
    """(read(path), by default the RGB PIL image; index actually loaded; [(path, reason)] of files that failed on
    the way)."""
    failed = []
    for k in range(min(MAX_SUBSTITUTES, len(files))):
        candidate = (index + k) % len(files)
        try:
            return (read or open_rgb)(files[candidate]), candidate, failed
        except Exception as e:  # any decode/read failure of a file that passed the scan
            failed.append((files[candidate], f"{type(e).__name__}: {' '.join(str(e).split())}"))
    raise RuntimeError(f"{len(failed)} consecutive images failed to load, first {printable(failed[0][0])}: "
                       f"{printable(failed[0][1])}; the data folder changed since it was scanned")


class _PilTwoViews:
    """Image file + per-sample generator -> (view 1, view 2 uint8 [3, S, S]): the PIL path."""

    def __init__(self, transform: TwoViewTransform):
        self.transform = transform

    def __call__(self, path: str, rng):
        return self.transform(open_rgb(path), rng)


class _TwoViewDataset(Dataset):
    """Item key (epoch, global position, file index) -> (*read_views(file, the sample's generator), failed files)."""

    def __init__(self, files, read_views, seed: int):
        self.files, self.read_views, self.seed = files, read_views, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        epoch, position, index = key
        views, _, failed = load_or_substitute(
            self.files, index, lambda path: self.read_views(path, sample_rng(self.seed, epoch, position)))
        return *views, failed


def _collate_two_views(samples):
    """[(tensor, ..., failed files)] -> (each tensor stacked [B, ...], ..., all failed files)."""
    columns = list(zip(*samples))
    return (*(default_collate(list(column)) for column in columns[:-1]), [bad for fails in columns[-1] for bad in fails])


def photometric_on_device(setting: str, device: torch.device) -> bool:
    """cfg.photometric_on (checked by Config.validate_data) resolved: True for the split path (module docstring)."""
    return setting == "device" or (setting == "auto" and device.type == "cuda")


class ShardBatchSampler:
    """Batches of dataset keys for the rank's epoch `epoch`, starting at batch `start_step`."""

    def __init__(self, shard: EpochShard):
        self.shard = shard
        self.epoch = 0
        self.start_step = 0

    def __len__(self) -> int:
        return self.shard.steps - self.start_step

    def __iter__(self):
        order, batch = self.shard.order(self.epoch), self.shard.batch_size
        for step in range(self.start_step, self.shard.steps):
            positions = range(step * batch, (step + 1) * batch)
            yield [(self.epoch, self.shard.global_position(p), int(order[p])) for p in positions]


class _WorkerInit:
    """A worker outlives SIGTERM / SIGINT / SIGHUP sent to the process group: the rank decides (it saves its
    checkpoint, then shuts its workers down, or it ends at once and kills them, moca_fast.ending); a worker
    killed under it would end the rank with an error instead. It dies with the rank (SIGKILL when the parent
    dies, however that happens)."""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        gc.freeze()
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        die_with_parent(self.parent)


_live_iterators: weakref.WeakSet = weakref.WeakSet()
_worker_pids: set[int] = set()


@atexit.register  # registered after torch's own exit hooks, so it runs before them
def _shut_down_workers_at_exit() -> None:
    """Shuts down the workers of live iterators, then kills any worker of ours still alive (an iterator
    collected without its workers exiting), before multiprocessing's exit handler waits on them."""
    for iterator in list(_live_iterators):
        try:
            iterator._shutdown_workers()  # also removes them from torch's SIGCHLD watch
        except Exception:  # noqa: BLE001 - the kill below still ends them
            pass
    import multiprocessing

    for process in multiprocessing.active_children():
        if process.pid in _worker_pids:
            process.kill()
            process.join()


def iterate(loader: DataLoader):
    """iter(loader), remembered (and its workers) so that they are ended at interpreter exit.

    The objects alive when workers fork are frozen out of the parent's garbage collector first: a full
    collection in the parent writes to every tracked object's header, and each page it writes is then
    copied for every worker (measured: +87 MB of worker USS at one parent gc.collect(), torch imported).
    Only when this iter() forks (persistent workers fork once), as frozen objects are never collected.
    """
    if loader.num_workers > 0 and (not loader.persistent_workers or loader._iterator is None):
        gc.collect()
        gc.freeze()
    iterator = iter(loader)
    if loader.num_workers > 0:
        _live_iterators.add(iterator)
        _worker_pids.update(w.pid for w in getattr(iterator, "_workers", []))
    return iterator


def data_loader(dataset, device: torch.device, num_workers: int, persistent: bool, **kwargs) -> DataLoader:
    return DataLoader(dataset, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and num_workers > 0, worker_init_fn=_WorkerInit(), **kwargs)


class TorchTwoViewLoader(LoaderPosition):
    """Yields (x1, x2): float32 [B, 3, S, S] on `device`, two views of the same B images.

    host_batches() yields what the workers hand over (the CPU's share of the work): (view 1, view 2 uint8
    [B, 3, S, S], failed files), with the photometric parameters float64 [B, 2, P] before the failed files on
    the split path."""

    backend = "torch"

    def __init__(self, images: ImageList, cfg, rank: int, world_size: int, device, read_views=None,
                 collate=_collate_two_views):
        """read_views(path, rng) -> the sample's tensors: the workers' work per image, by default the PIL path's
        or the split path's (cfg.photometric_on); another one (a benchmark's, a subclass's) comes with the collate
        function of its samples, and is iterated with host_batches."""
        self.device = torch.device(device)
        self.num_images = len(images)
        self.skipped = list(images.skipped)
        self.substituted = 0
        self.shard = EpochShard(self.num_images, rank, world_size, cfg.batch_size, cfg.seed,
                                source=f"data folder {images.root}")
        self._sampler = ShardBatchSampler(self.shard)
        self.split = photometric_on_device(cfg.photometric_on, self.device)
        if read_views is None and self.split:
            read_views = CropFlipTwoViews(cfg.img_size, cfg.crop_min)
        elif read_views is None:
            read_views = _PilTwoViews(TwoViewTransform(cfg.img_size, cfg.crop_min))
        if rank == 0:
            log.info("photometric operations: %s", f"batched on {self.device.type}" if self.split else "in the workers")
        self._loader = data_loader(_TwoViewDataset(images.files, read_views, cfg.seed), self.device, cfg.num_workers,
                                    persistent=True, batch_sampler=self._sampler, collate_fn=collate)
        self._normalize = Normalizer(self.device)
        self._photometric = Photometric()

    def __len__(self) -> int:
        return self.shard.steps

    def host_batches(self):
        self._sampler.epoch, self._sampler.start_step = self.epoch, self.step
        if self.step >= len(self):
            return
        for batch in iterate(self._loader):
            note_failed(self, batch[-1])
            self.step += 1
            yield batch

    def __iter__(self):
        for view1, view2, *params, _ in self.host_batches():
            if self.split:
                view1, view2 = (self._photometric(view.to(self.device, non_blocking=True), params[0][:, k])
                                for k, view in enumerate((view1, view2)))
            yield self._normalize(view1), self._normalize(view2)


def note_failed(loader, failed: list[tuple[str, str]]) -> None:
    for path, reason in failed:
        log.warning("image unreadable since the scan, substituted by the next one: %s: %s", printable(path),
                    printable(reason))
    loader.skipped.extend(failed)
    loader.substituted += len(failed)


class _EvalDataset(Dataset):
    def __init__(self, images: ImageList, transform: EvalTransform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img, loaded, failed = load_or_substitute(self.images.files, index)
        return self.transform(img), self.images.labels[loaded], index, failed


def _collate_eval(samples):
    return (default_collate([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.long),
            torch.tensor([s[2] for s in samples], dtype=torch.long), [bad for s in samples for bad in s[3]])


class TorchEvalLoader:
    """Yields (images float32 [B, 3, S, S], labels long [B], indices long [B]) on `device`.

    Rank r gets images r, r + world_size, ...; over all ranks every image comes exactly once.
    indices are positions in the ImageList; a substituted image keeps the index it replaces.
    """

    def __init__(self, images: ImageList, cfg, rank: int, world_size: int, device, batch_size: int | None = None):
        self.device = torch.device(device)
        self.num_images = len(images)
        self.classes = list(images.classes)
        self.skipped = list(images.skipped)
        self.substituted = 0
        self.batch_size = batch_size or cfg.batch_size
        self.indices = range(rank, self.num_images, world_size)
        self._loader = data_loader(_EvalDataset(images, EvalTransform(cfg.img_size)), self.device,
                                    cfg.num_workers, persistent=False, sampler=self.indices,
                                    batch_size=self.batch_size, collate_fn=_collate_eval)
        self._normalize = Normalizer(self.device)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for images, labels, indices, failed in iterate(self._loader):
            note_failed(self, failed)
            yield (self._normalize(images), labels.to(self.device, non_blocking=True),
                   indices.to(self.device, non_blocking=True))
