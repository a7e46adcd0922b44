"""NVIDIA DALI backend: the paper's two views decoded and augmented on the GPU (nvJPEG), or on the CPU.

One pipeline definition; the device is the only difference: on a GPU the decoder runs "mixed"
(nvJPEG) and every image op on the GPU, without one everything runs on the CPU (device_id=None).

Inputs: the pipeline has no file reader and no random operator. A torch DataLoader over the same
batch sampler as the torch backend (keys (epoch, global position, index), the rank's EpochShard order)
reads each file's bytes in its workers, takes the image size from the header, and draws the sample's
random choices with transforms.sample_views from sample_rng(seed, epoch, global position): the very
choices the torch backend makes for that sample. The batch of encoded files and choices is fed to the
pipeline through an external source. So the pipeline is built once per run, every batch is a fixed
function of (seed, epoch, rank, step), and a resume starts the DataLoader at the saved step: nothing
is decoded to be thrown away.

Per view, in the official order (moca_fast.data.transforms has the numbers):

  crop      the given RandomResizedCrop window of the image decoded once for both views, bilinear
            antialiased resize
  jitter    brightness, contrast, saturation, hue in the given order (one of the 24), factors as
            torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1)
  grayscale (ITU-R 601 luma, as PIL's convert("L")), blur (window 2*ceil(3 sigma)+1: PIL's
            GaussianBlur radius is its sigma), solarize (threshold 128), horizontal flip, then
            normalisation to float32 CHW (crop_mirror_normalize).

The colour operations reproduce torchvision's PIL arithmetic: brightness, contrast and
saturation are PIL's blends (clamped and truncated to uint8 after each operation, contrast around
the rounded mean luma), hue is PIL's 8-bit HSV round trip with H shifted by int(hue * 255)
modulo 256 (computed in float32 where PIL mixes float and double: about 0.1 % of the pixels of a
hue-shifted image differ, by a few grey levels). Remaining differences: decoding and the
antialiased bilinear resize are DALI's (within a grey level or two of PIL's); the blur is an exact
Gaussian with mirrored borders where PIL uses three box blurs with repeated edges; 16-bit PNGs
are scaled to 8 bits where the PIL path keeps the high byte. EXIF orientation is ignored by both
backends, as by the official loader.

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
import itertools
import logging
import os
import socket
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import nvidia.dali.math as dmath
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image
from torch.utils.data import Dataset

from moca_fast.data.image_list import ImageList
from moca_fast.data.scan import DALI_SIGNATURES, cache_root, check_image, has_signature, open_rgb, printable
from moca_fast.data.sharding import EpochShard, LoaderPosition, sample_rng
from moca_fast.data.torch_backend import MAX_SUBSTITUTES, ShardBatchSampler, data_loader, iterate, note_failed
from moca_fast.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, VIEWS, ViewParams,
                                       ViewRecipe, sample_views)

log = logging.getLogger("moca_fast.data")

VIEW_NAMES = ("view1", "view2")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
JITTER_ORDERS = tuple(itertools.permutations(range(len(JITTER_OPS))))
_HUE, _NO_OP = JITTER_OPS.index("hue"), -1
# per order: the j-th operation before the hue and the j-th after it (_NO_OP where there is none)
BLENDS_BEFORE_HUE = [[o[j] if j < o.index(_HUE) else _NO_OP for o in JITTER_ORDERS] for j in range(3)]
BLENDS_AFTER_HUE = [[o[o.index(_HUE) + 1 + j] if o.index(_HUE) + 1 + j < 4 else _NO_OP for o in JITTER_ORDERS]
                    for j in range(3)]
#: one view's choices as pipeline inputs: name -> (DALI type, dimensions, numpy type)
PARAMS = {"crop": (types.INT32, 1, np.int32), "jitter": (types.BOOL, 0, np.bool_),
          "jitter_factors": (types.FLOAT, 1, np.float32), "jitter_order": (types.INT32, 0, np.int32),
          "grayscale": (types.BOOL, 0, np.bool_), "blur": (types.BOOL, 0, np.bool_),
          "blur_sigma": (types.FLOAT, 0, np.float32), "solarize": (types.BOOL, 0, np.bool_),
          "flip": (types.BOOL, 0, np.bool_)}
TRANSCODE_FOLDER = "dali_transcoded"
IDENTITY_FACTORS = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


def view_inputs(params: ViewParams) -> dict:
    """One view's ViewParams as the pipeline's inputs (PARAMS; crop = top, left, height, width)."""
    factors = {**IDENTITY_FACTORS, **dict(params.jitter)}
    order = JITTER_ORDERS.index(tuple(JITTER_OPS.index(name) for name, _ in params.jitter)) if params.jitter else 0
    values = {"crop": params.crop, "jitter": bool(params.jitter), "jitter_factors": [factors[op] for op in JITTER_OPS],
              "jitter_order": order, "grayscale": params.grayscale, "blur": params.blur_radius is not None,
              "blur_sigma": params.blur_radius or 0.0, "solarize": params.solarize, "flip": params.flip}
    return {name: np.asarray(values[name], dtype=PARAMS[name][2]) for name in PARAMS}


# ----------------------------------------------------------------------------------------------
# pipeline graph (device-agnostic: every op takes the device of its input)

def _beside(scalar, img):
    """A per-sample CPU scalar, moved to img's device for arithmetic with img."""
    return scalar.gpu() if img.device == "gpu" else scalar


def _as_float(x):
    return fn.cast(x, dtype=types.FLOAT)


def _luma(img):
    """uint8 [H, W, 3] -> uint8 [H, W, 1], 0.299 R + 0.587 G + 0.114 B (PIL's convert("L"))."""
    return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)


def _blend(img, degenerate, factor):
    """PIL's Image.blend(degenerate, img, factor): clamp to [0, 255], truncate to uint8."""
    x = _as_float(img)
    out = degenerate + _beside(factor, img) * (x - degenerate)
    return fn.cast(dmath.floor(dmath.clamp(out, 0.0, 255.0)), dtype=types.UINT8)


def _blend_op(img, op, factors):
    """JITTER_OPS[op] for op in 0..2 (brightness, contrast, saturation); any other op: unchanged."""
    if op == 0:
        img = _blend(img, 0.0, factors[0])
    elif op == 1:
        mean_luma = dmath.floor(fn.reductions.mean(_luma(img)) + 0.5)
        img = _blend(img, mean_luma, factors[1])
    elif op == 2:
        img = _blend(img, _as_float(_luma(img)), factors[2])
    return img


def _pil_hue(img, hue):
    """torchvision's adjust_hue on a PIL image, per pixel: PIL's 8-bit HSV (H scaled to 0..255 and
    truncated), H shifted by int(hue * 255) modulo 256, back to RGB; uint8 [H, W, 3] in and out."""
    x = _as_float(img)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    chroma = v - dmath.min(dmath.min(r, g), b)
    divisor = dmath.max(chroma, 1.0)
    red_max = _as_float(r == v)
    green_max = _as_float(g == v) * (1.0 - red_max)
    blue_max = 1.0 - red_max - green_max
    rc, gc, bc = (v - r) / divisor, (v - g) / divisor, (v - b) / divisor
    h = (red_max * (bc - gc) + green_max * (2.0 + rc - bc) + blue_max * (4.0 + gc - rc)) / 6.0 + 1.0
    h = dmath.floor((h - dmath.floor(h)) * 255.0) * _as_float(chroma > 0)
    s = dmath.floor(chroma / dmath.max(v, 1.0) * 255.0)
    shift = hue * 255.0
    shift = dmath.floor(shift) + _as_float((shift < 0) & (dmath.floor(shift) != shift))  # C's (int) cast
    h = h + _beside(shift, img)
    sector_pos = (h - 256.0 * dmath.floor(h / 256.0)) * 6.0 / 255.0
    sector = dmath.floor(sector_pos)
    frac, sat = sector_pos - sector, s / 255.0
    p = dmath.floor(v * (1.0 - sat) + 0.5)
    q = dmath.floor(v * (1.0 - sat * frac) + 0.5)
    t = dmath.floor(v * (1.0 - sat * (1.0 - frac)) + 0.5)
    sector = sector - 6.0 * _as_float(sector >= 6.0)  # h = 255 gives sector 6, PIL's i % 6
    k = [_as_float(sector == j) for j in range(6)]
    out_r = v * (k[0] + k[5]) + q * k[1] + p * (k[2] + k[3]) + t * k[4]
    out_g = t * k[0] + v * (k[1] + k[2]) + q * k[3] + p * (k[4] + k[5])
    out_b = p * (k[0] + k[1]) + t * k[2] + v * (k[3] + k[4]) + q * k[5]
    return fn.cast(fn.stack(out_r, out_g, out_b, axis=2, axis_name="C"), dtype=types.UINT8)


def _color_jitter(img, factors, order):
    """torchvision ColorJitter on uint8 [H, W, 3] in the order JITTER_ORDERS[order], arranged as up to
    three blends, the hue, then the remaining blends (so the costly hue is one operator)."""
    for table in BLENDS_BEFORE_HUE + [None] + BLENDS_AFTER_HUE:
        if table is None:
            img = _pil_hue(img, factors[3])
        else:
            op = fn.lookup_table(order, keys=list(range(len(JITTER_ORDERS))), values=table, dtype=types.INT32)
            img = _blend_op(img, op, factors)
    return img


def _view(image, p: dict, img_size: int):
    """One augmented view of the decoded uint8 [H, W, 3] image with the choices p (PARAMS): float32 [3, S, S]."""
    crop = p["crop"]
    img = fn.slice(image, crop[0:2], crop[2:4], axis_names="HW")
    img = fn.resize(img, size=[img_size, img_size], interp_type=types.INTERP_LINEAR, antialias=True)
    if p["jitter"]:
        img = _color_jitter(img, [p["jitter_factors"][k] for k in range(len(JITTER_OPS))], p["jitter_order"])
    if p["grayscale"]:
        luma = _luma(img)
        img = fn.cat(luma, luma, luma, axis=2)
    if p["blur"]:
        img = fn.gaussian_blur(img, sigma=p["blur_sigma"])
    if p["solarize"]:
        img = fn.lookup_table(img, keys=list(range(256)), dtype=types.UINT8,
                              values=[255 - v if v >= SOLARIZE_THRESHOLD else v for v in range(256)])
    return fn.crop_mirror_normalize(img, mirror=fn.cast(p["flip"], dtype=types.INT32), dtype=types.FLOAT,
                                    output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
                                    std=[255 * s for s in IMAGENET_STD])


def input_names(views: int = len(VIEW_NAMES)) -> list[str]:
    """The external source's outputs, in order: the encoded files, then each view's PARAMS."""
    return ["encoded"] + [f"{v}_{name}" for v in VIEW_NAMES[:views] for name in PARAMS]


def _two_view_graph(source, img_size: int, decoder: str):
    names = input_names()
    kinds = [(types.UINT8, 1)] + [PARAMS[n.split("_", 1)[1]][:2] for n in names[1:]]
    inputs = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                                dtype=[k[0] for k in kinds], ndim=[k[1] for k in kinds])))
    image = fn.decoders.image(inputs["encoded"], device=decoder, output_type=types.RGB, adjust_orientation=False)
    return tuple(_view(image, {name: inputs[f"{v}_{name}"] for name in PARAMS}, img_size) for v in VIEW_NAMES)


def two_view_pipeline(source, batch_size: int, img_size: int, device_id: int | None = None, num_threads: int = 1):
    """The (unbuilt) DALI pipeline; outputs view1, view2 float32 [B, 3, S, S].

    source(): the next batch as a list of input_names() columns (the encoded files as uint8 arrays, the
    choices as [B, ...] arrays); raises StopIteration at the end of an epoch. device_id=None: all on the
    CPU; else nvJPEG decode and GPU ops on that device.
    """
    decoder = "cpu" if device_id is None else "mixed"
    build = pipeline_def(_two_view_graph, enable_conditionals=True)
    return build(source, img_size, decoder, batch_size=batch_size, num_threads=num_threads, device_id=device_id)


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
