"""NVIDIA DALI backend: the paper's two views decoded and augmented on the GPU (nvJPEG), or on the CPU. The
pipeline (one definition for both devices, its operations and their PIL arithmetic): moca_fast.data.dali_pipeline.

Inputs: the pipeline has no file reader and no random operator. A torch DataLoader over the same
batch sampler as the torch backend (keys (epoch, global position, index), the rank's EpochShard order)
reads each file's bytes in its workers, takes the image size from the header, and draws the sample's
random choices with transforms.sample_views from sample_rng(seed, epoch, global position): the very
choices the torch backend makes for that sample. The batch of encoded files and choices is fed to the
pipeline through an external source. So the pipeline is built once per run, every batch is a fixed
function of (seed, epoch, rank, step), and a resume starts the DataLoader at the saved step: nothing
is decoded to be thrown away.

Files: the scan's verdicts are reused, nothing is checked again at start: the files it found in a
format DALI cannot decode (GIF and other formats PIL reads under an image extension) are transcoded
once to PNG under <cache>/dali_transcoded/ and read from there. A file that no longer reads or whose
header no longer parses (changed since the scan) is replaced by the next usable file of the list in
the DataLoader worker, as the torch backend does (counted in `substituted`, listed in `skipped`). A
file that breaks the decoder itself (truncated after the scan) stops the pipeline: the loader then
re-checks this rank's files of the epoch, substitutes each broken one the same way and rebuilds the
pipeline at the same step.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image
from torch.utils.data import Dataset

from moca_fast.data.dali_pipeline import PARAMS, VIEW_NAMES, input_names, two_view_pipeline, view_inputs
from moca_fast.data.image_list import ImageList
from moca_fast.data.scan import DALI_SIGNATURES, check_image, has_signature, open_rgb, printable
from moca_fast.data.scan_cache import cache_root
from moca_fast.data.sharding import EpochShard, LoaderPosition, sample_rng
from moca_fast.data.torch_backend import MAX_SUBSTITUTES, ShardBatchSampler, data_loader, iterate, note_failed
from moca_fast.data.transforms import VIEWS, ViewRecipe, sample_views

log = logging.getLogger("moca_fast.data")

TRANSCODE_FOLDER = "dali_transcoded"


# ----------------------------------------------------------------------------------------------
# the files: read in DataLoader workers, with their choices

def _transcoded_path(path: str) -> str:
    """An RGB PNG copy of `path` (decoded as the scan decodes it), written once, keyed on size and mtime."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / TRANSCODE_FOLDER / f"{key}.png"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # ranks on several nodes may write one shared cache: the host name keeps their temporary files apart
        tmp = target.with_name(f"{target.name}.{socket.gethostname()}.{os.getpid()}.tmp.png")
        open_rgb(path).save(tmp)
        os.replace(tmp, target)
    return str(target)


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data)).size


class _EncodedDataset(Dataset):
    """Key (epoch, global position, file index) -> (encoded bytes uint8 [n], the views' choices, failed files).

    A file that cannot be read, is no longer in a format DALI decodes or whose header does not parse is
    replaced by the next usable file of the list; `unusable` holds the indices found broken before."""

    def __init__(self, files, replaced: dict[int, str], unusable: set[int], seed: int, crop_min: float, recipes):
        self.files, self.replaced, self.unusable = files, replaced, unusable
        self.seed, self.crop_min, self.recipes = seed, crop_min, recipes

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int):
        failed = []
        for k in range(min(MAX_SUBSTITUTES, len(self.files))):
            candidate = (index + k) % len(self.files)
            if candidate in self.unusable:
                continue
            try:
                path = self.replaced.get(candidate) or self.files[candidate]
                with open(path, "rb") as f:
                    data = f.read()
                if not has_signature(data[:12], DALI_SIGNATURES):
                    raise ValueError("changed since the scan to a format DALI cannot decode")
                return data, _header_size(data), failed
            except Exception as e:  # any read or header failure of a file that passed the scan
                failed.append((self.files[candidate], f"{type(e).__name__}: {' '.join(str(e).split())}"))
        raise RuntimeError(f"{MAX_SUBSTITUTES} consecutive images failed to load, first {printable(failed[0][0])}: "
                           f"{printable(failed[0][1])}; the data folder changed since it was scanned")

    def __getitem__(self, key):
        epoch, position, index = key
        data, (width, height), failed = self.read(index)
        views = sample_views(sample_rng(self.seed, epoch, position), width, height, self.crop_min, self.recipes)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), [view_inputs(v) for v in views], failed


def _collate_encoded(samples):
    """(all files' bytes concatenated uint8 [sum n], their lengths, {input name: [B, ...]}, failed files)."""
    columns = {f"{v}_{name}": np.stack([s[1][i][name] for s in samples])
               for i, v in enumerate(VIEW_NAMES) for name in PARAMS}
    return (torch.cat([s[0] for s in samples]), [len(s[0]) for s in samples], columns,
            [bad for s in samples for bad in s[2]])


class _Source:
    """The pipeline's source: the loader's next inputs, through a weak reference (no reference cycle, so a
    dropped loader is freed at once and its reader's workers shut down)."""

    def __init__(self, loader: "DaliTwoViewLoader"):
        self.loader = weakref.ref(loader)

    def __call__(self) -> list:
        loader = self.loader()
        if loader is None:
            raise StopIteration
        return loader._next_inputs()


# ----------------------------------------------------------------------------------------------
# the loader

class DaliTwoViewLoader(LoaderPosition):
    """Yields (x1, x2): float32 [B, 3, S, S] on `device`, two views of the same B images.

    One DALI pipeline for the run, fed by a DataLoader over this rank's shard (see the module docstring).
    """

    backend = "dali"

    def __init__(self, images: ImageList, cfg, rank: int, world_size: int, device,
                 views: tuple[ViewRecipe, ViewRecipe] = VIEWS):
        self.device = torch.device(device)
        self.num_images = len(images)
        self.images = images
        self.skipped = list(images.skipped)
        self.substituted = 0
        self.shard = EpochShard(self.num_images, rank, world_size, cfg.batch_size, cfg.seed,
                                source=f"data folder {images.root}")
        self.img_size, self.views, self.cfg = cfg.img_size, views, cfg
        self.num_threads = max(1, cfg.num_workers)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.replaced = self._transcode(images)
        self.unusable: set[int] = set()
        self._sampler = ShardBatchSampler(self.shard)
        self._reader = self._make_reader()
        self._batches = None  # the reader's iterator of the current epoch: the pipeline's source
        self._pipeline = self._build_pipeline()
        self._state = ("fresh", None)  # or ("running", (epoch, next step)), ("drained", None)

    def __len__(self) -> int:
        return self.shard.steps

    def path(self, index: int) -> str:
        """The file read for image `index` (its PNG copy when DALI cannot decode the original)."""
        return self.replaced.get(index) or self.images.files[index]

    def _transcode(self, images: ImageList) -> dict[int, str]:
        replaced = {}
        for index in images.pil_only.tolist():
            try:
                replaced[index] = _transcoded_path(images.files[index])
            except Exception:  # noqa: BLE001 - no longer decodes: the reader substitutes it when drawn
                pass
        if replaced:
            shown = ", ".join(printable(images.files[i]) for i in list(replaced)[:5]) + (" ..." if len(replaced) > 5 else "")
            log.info("DALI: %d images in formats DALI cannot decode are read from PNG copies in %s: %s",
                     len(replaced), printable(cache_root() / TRANSCODE_FOLDER), shown)
        return replaced

    def _make_reader(self):
        dataset = _EncodedDataset(self.images.files, self.replaced, set(self.unusable), self.shard.seed,
                                  self.cfg.crop_min, self.views)
        # reading and header parsing are ~1 % of a CPU decode: a few workers feed all the pipeline's threads
        return data_loader(dataset, self.device, min(self.cfg.num_workers, 4), persistent=True,
                           batch_sampler=self._sampler, collate_fn=_collate_encoded)

    def _build_pipeline(self) -> DALIGenericIterator:
        pipe = two_view_pipeline(_Source(self), self.shard.batch_size, self.img_size, self.device_id,
                                 self.num_threads)
        return DALIGenericIterator(pipe, list(VIEW_NAMES), prepare_first_batch=False)

    def _next_inputs(self) -> list:
        """The pipeline's source: the next batch of the reader as input_names() columns."""
        encoded, lengths, columns, failed = next(self._batches)
        note_failed(self, failed)
        files = np.split(encoded.numpy(), np.cumsum(lengths)[:-1])
        return [files] + [columns[name] for name in input_names()[1:]]

    def _position_pipeline(self) -> None:
        """Points the pipeline's source at (epoch, step): the live pipeline continues where it stands, a
        drained one is reset for the next epoch, one left mid-epoch elsewhere is rebuilt."""
        state, position = self._state
        if state == "running" and position == (self.epoch, self.step):
            return
        if state == "running" and position[1] == len(self):  # its source ended that epoch: collect the end
            try:
                next(self._pipeline)
                raise RuntimeError("the DALI pipeline gave a batch past the end of its epoch")
            except StopIteration:
                state = "drained"
        elif state == "running":
            self._pipeline = self._build_pipeline()
            state = "fresh"
        self._sampler.epoch, self._sampler.start_step = self.epoch, self.step
        self._batches = iterate(self._reader)
        if state == "drained":
            self._pipeline.reset()
        self._state = ("running", (self.epoch, self.step))

    def __iter__(self):
        if self.step >= len(self):
            return
        self._position_pipeline()
        while self.step < len(self):
            try:
                batch = next(self._pipeline)[0]
            except RuntimeError as error:  # DALI stops on a file that broke after the scan
                self._recover(error)
                continue
            self.step += 1
            self._state = ("running", (self.epoch, self.step))
            yield (batch["view1"].to(self.device, non_blocking=True),
                   batch["view2"].to(self.device, non_blocking=True))

    def _recover(self, error: RuntimeError) -> None:
        """Re-checks this epoch's files, marks the broken ones unusable (the reader substitutes them), and
        rebuilds the reader and the pipeline at the same step; re-raises `error` when none is broken."""
        log.warning("DALI pipeline failed in epoch %d at step %d (%s); re-checking this epoch's %d files",
                    self.epoch, self.step, printable(" ".join(str(error).split())[:300]), self.shard.per_rank)
        indices = sorted({int(i) for i in self.shard.order(self.epoch)} - self.unusable)
        with ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1))) as pool:
            reasons = list(pool.map(lambda i: check_image(self.path(i)), indices))
        broken = {i: reason for i, reason in zip(indices, reasons) if reason is not None}
        if not broken:
            raise error
        for index, reason in broken.items():
            note_failed(self, [(self.images.files[index], reason)])
        self.unusable |= set(broken)
        self._reader = self._make_reader()
        self._pipeline = self._build_pipeline()
        self._state = ("fresh", None)
        self._position_pipeline()
