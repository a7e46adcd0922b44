"""NVIDIA DALI backend: the paper's two views decoded and augmented on the GPU (nvJPEG), or on the CPU.

One pipeline definition; the device is the only difference: on a GPU the decoder runs "mixed"
(nvJPEG) and every image op on the GPU, without one everything runs on the CPU (device_id=None).
Per view, in the official order (moca_fast.data.transforms has the numbers):

  crop      random_crop_generator (RandomResizedCrop's sampling: area fraction U(crop_min, 1),
            log-uniform aspect in (3/4, 4/3), 10 attempts, then a centre crop) on the image
            decoded once for both views (two ROI decodes, one per view, cost more than one full
            decode and two slices), bilinear antialiased resize
  jitter    with p 0.8: brightness, contrast, saturation, hue in a random order (one of the 24
            orders, uniformly), factors as torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1)
  grayscale with p 0.2 (ITU-R 601 luma, as PIL's convert("L")), blur with p 1.0 / 0.1
            (sigma ~ U(0.1, 2), window 2*ceil(3 sigma)+1: PIL's GaussianBlur radius is its sigma),
            solarize with p 0 / 0.2 (threshold 128), horizontal flip with p 0.5, then
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

Randomness: the pipeline of rank r in epoch e is seeded with sample_seed(seed, e, r), reads
the rank's shard of the epoch in the order moca_fast.data.sharding.EpochShard gives (the same
images per step as the torch backend). Resuming at step s rebuilds that pipeline and runs and
discards s batches, so the remaining batches are identical to the uninterrupted run's.

Files DALI cannot decode (GIF and other formats PIL reads under an image extension) are
transcoded once to PNG under <cache>/dali_transcoded/ and read from there. A file that breaks
after the scan stops the DALI pipeline; the loader then re-checks the epoch's files, substitutes
each broken one by the next usable file of the list (as the torch backend does; counted in
`substituted`, listed in `skipped`) and restarts the epoch's pipeline at the same step. A file that
no longer decodes when the loader starts (changed behind the scan cache, same size and mtime) is
substituted the same way.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from moca_fast.data.scan import ImageList, cache_root, check_image, file_head, has_signature, open_rgb
from moca_fast.data.sharding import EpochShard, LoaderPosition, sample_seed
from moca_fast.data.torch_backend import note_failed
from moca_fast.data.transforms import (BLUR_RADIUS, CROP_ATTEMPTS, CROP_RATIO, CROP_SCALE_MAX, FLIP_P,
                                       GRAYSCALE_P, IMAGENET_MEAN, IMAGENET_STD, JITTER_BRIGHTNESS,
                                       JITTER_CONTRAST, JITTER_HUE, JITTER_P, JITTER_SATURATION,
                                       SOLARIZE_THRESHOLD, VIEWS)

log = logging.getLogger("moca_fast.data")

VIEW_NAMES = ("view1", "view2")
PARAM_NAMES = ("image_shape", "crop_anchor", "crop_shape", "jitter", "jitter_factors", "jitter_order",
               "grayscale", "blur", "blur_sigma", "solarize", "flip")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
JITTER_RANGES = ((1 - JITTER_BRIGHTNESS, 1 + JITTER_BRIGHTNESS), (1 - JITTER_CONTRAST, 1 + JITTER_CONTRAST),
                 (1 - JITTER_SATURATION, 1 + JITTER_SATURATION), (-JITTER_HUE, JITTER_HUE))
JITTER_ORDERS = tuple(itertools.permutations(range(len(JITTER_OPS))))
_HUE, _NO_OP = JITTER_OPS.index("hue"), -1
# per order: the j-th operation before the hue and the j-th after it (_NO_OP where there is none)
BLENDS_BEFORE_HUE = [[o[j] if j < o.index(_HUE) else _NO_OP for o in JITTER_ORDERS] for j in range(3)]
BLENDS_AFTER_HUE = [[o[o.index(_HUE) + 1 + j] if o.index(_HUE) + 1 + j < 4 else _NO_OP for o in JITTER_ORDERS]
                    for j in range(3)]
DALI_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")
TRANSCODE_FOLDER = "dali_transcoded"
READER_NAME = "reader"


@dataclass(frozen=True)
class ViewAugment:
    """The probabilities of one view's random operations (PAPER_VIEWS: the paper's)."""

    blur_p: float
    solarize_p: float
    jitter_p: float = JITTER_P
    grayscale_p: float = GRAYSCALE_P
    flip_p: float = FLIP_P


PAPER_VIEWS = tuple(ViewAugment(r.blur_p, r.solarize_p) for r in VIEWS)


# ----------------------------------------------------------------------------------------------
# pipeline graph (device-agnostic: every op takes the device of its input)

def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


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


def _view(image, image_shape, aug: ViewAugment, img_size: int, crop_min: float):
    """One augmented view of the decoded uint8 [H, W, 3] image: float32 [3, S, S] normalised, and its
    random choices (PARAM_NAMES; crop_* in HW order, jitter_factors in JITTER_OPS order,
    jitter_order indexes JITTER_ORDERS)."""
    anchor, crop = fn.random_crop_generator(image_shape, random_area=[crop_min, CROP_SCALE_MAX],
                                            random_aspect_ratio=list(CROP_RATIO), num_attempts=CROP_ATTEMPTS)
    img = fn.slice(image, anchor, crop, axis_names="HW")
    img = fn.resize(img, size=[img_size, img_size], interp_type=types.INTERP_LINEAR, antialias=True)
    jitter = _coin(aug.jitter_p)
    factors = [fn.random.uniform(range=list(r)) for r in JITTER_RANGES]
    order = fn.random.uniform(values=list(range(len(JITTER_ORDERS))), dtype=types.INT32)
    grayscale, blur = _coin(aug.grayscale_p), _coin(aug.blur_p)
    sigma = fn.random.uniform(range=list(BLUR_RADIUS))
    solarize, flip = _coin(aug.solarize_p), _coin(aug.flip_p)
    if jitter:
        img = _color_jitter(img, factors, order)
    if grayscale:
        luma = _luma(img)
        img = fn.cat(luma, luma, luma, axis=2)
    if blur:
        img = fn.gaussian_blur(img, sigma=sigma)
    if solarize:
        img = fn.lookup_table(img, keys=list(range(256)), dtype=types.UINT8,
                              values=[255 - v if v >= SOLARIZE_THRESHOLD else v for v in range(256)])
    out = fn.crop_mirror_normalize(img, mirror=fn.cast(flip, dtype=types.INT32), dtype=types.FLOAT,
                                   output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
                                   std=[255 * s for s in IMAGENET_STD])
    return out, (image_shape, anchor, crop, jitter, fn.stack(*factors), order, grayscale, blur, sigma,
                 solarize, flip)


def _two_view_graph(files: list[str], img_size: int, crop_min: float, views: tuple, decoder: str,
                    expose_params: bool):
    encoded, _ = fn.readers.file(files=files, random_shuffle=False, name=READER_NAME)
    image_shape = fn.peek_image_shape(encoded, adjust_orientation=False)
    image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
    outputs, params = [], []
    for aug in views:
        out, choices = _view(image, image_shape, aug, img_size, crop_min)
        outputs.append(out)
        params.extend(choices)
    return tuple(outputs) + (tuple(params) if expose_params else ())


def two_view_pipeline(files: list[str], batch_size: int, img_size: int, crop_min: float, seed: int,
                      device_id: int | None = None, num_threads: int = 1,
                      views: tuple[ViewAugment, ViewAugment] = PAPER_VIEWS, expose_params: bool = False):
    """The (unbuilt) DALI pipeline reading `files` in order; outputs view1, view2 float32 [B, 3, S, S].

    device_id=None: all on the CPU; else nvJPEG decode and GPU ops on that device.
    expose_params adds, per view, the random choices named by output_names(True).
    """
    decoder = "cpu" if device_id is None else "mixed"
    build = pipeline_def(_two_view_graph, enable_conditionals=True)
    return build(files, img_size, crop_min, tuple(views), decoder, expose_params, batch_size=batch_size,
                 num_threads=num_threads, device_id=device_id, seed=seed & 0x7FFFFFFF)


def output_names(expose_params: bool = False) -> list[str]:
    params = [f"{v}_{p}" for v in VIEW_NAMES for p in PARAM_NAMES] if expose_params else []
    return list(VIEW_NAMES) + params


# ----------------------------------------------------------------------------------------------
# files DALI cannot decode

def _dali_decodes(path: str) -> bool:
    """True when the file's signature is a format DALI decodes (JPEG, PNG, BMP, TIFF, WebP), or when
    the file cannot be read now (the loader substitutes it if the reader meets it)."""
    head = file_head(path)
    return head is None or has_signature(head, DALI_SIGNATURES)


def _why_unusable(path: str) -> str | None:
    """None when DALI can read `path` now, else why not (the scan's check plus the format)."""
    reason = check_image(path)
    if reason is None and not _dali_decodes(path):
        reason = "changed since the scan to a format DALI cannot decode"
    return reason


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


def _check_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1)))


def dali_readable_files(files: list[str]) -> tuple[list[str], dict[int, str]]:
    """(`files` with each file DALI cannot decode replaced by its PNG transcode (logged), {index: why} of
    the files that no longer decode at all: changed since the scan, with the same size and mtime)."""
    started = time.monotonic()
    with _check_threads() as pool:
        decodable = list(pool.map(_dali_decodes, files, chunksize=256))
    foreign = [i for i, ok in enumerate(decodable) if not ok]
    out, broken = list(files), {}
    for i in foreign:
        try:
            out[i] = _transcoded_path(files[i])
        except Exception as e:  # PIL raises many types on a file that no longer decodes
            broken[i] = f"changed since the scan and no longer decodes ({type(e).__name__}: {' '.join(str(e).split())})"
    transcoded = [i for i in foreign if i not in broken]
    if transcoded:
        shown = ", ".join(files[i] for i in transcoded[:5]) + (" ..." if len(transcoded) > 5 else "")
        log.info("DALI: %d images in formats DALI cannot decode are read from PNG copies in %s: %s",
                 len(transcoded), cache_root() / TRANSCODE_FOLDER, shown)
    log.info("DALI: checked the format of %d files in %.1f s", len(files), time.monotonic() - started)
    return out, broken


# ----------------------------------------------------------------------------------------------
# the loader

class DaliTwoViewLoader(LoaderPosition):
    """Yields (x1, x2): float32 [B, 3, S, S] on `device`, two views of the same B images.

    One DALI pipeline per epoch over this rank's shard (see the module docstring).
    """

    backend = "dali"

    def __init__(self, images: ImageList, cfg, rank: int, world_size: int, device,
                 views: tuple[ViewAugment, ViewAugment] = PAPER_VIEWS):
        self.device = torch.device(device)
        self.num_images = len(images)
        self.skipped = list(images.skipped)
        self.shard = EpochShard(self.num_images, rank, world_size, cfg.batch_size, cfg.seed,
                                source=f"data folder {images.root}")
        self.substituted = 0
        self.files, broken = dali_readable_files(images.files)
        self._substitute(broken)
        self.img_size, self.crop_min, self.views = cfg.img_size, cfg.crop_min, views
        self.num_threads = max(1, cfg.num_workers)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        # (epoch, next step, DALIGenericIterator) of the running pipeline; epoch 0's is built now, so
        # that a pipeline that cannot run here fails at construction and prefetching starts early
        self._live = (0, 0, self._start(0, 0))

    def __len__(self) -> int:
        return self.shard.steps

    def _start(self, epoch: int, step: int) -> DALIGenericIterator:
        """The iterator of `epoch`'s pipeline, positioned at batch `step`."""
        self._live = None
        order = self.shard.order(epoch)[: self.shard.steps * self.shard.batch_size]
        pipe = two_view_pipeline([self.files[i] for i in order], self.shard.batch_size, self.img_size,
                                 self.crop_min, sample_seed(self.shard.seed, epoch, self.shard.rank),
                                 self.device_id, self.num_threads, self.views)
        iterator = DALIGenericIterator(pipe, list(VIEW_NAMES), reader_name=READER_NAME,
                                       last_batch_policy=LastBatchPolicy.DROP)
        if step:
            started = time.monotonic()
            for _ in range(step):
                next(iterator)
            log.info("DALI: resumed epoch %d at step %d (%.1f s to replay the skipped batches)",
                     epoch, step, time.monotonic() - started)
        return iterator

    def __iter__(self):
        live = self._live
        iterator = live[2] if live and live[:2] == (self.epoch, self.step) else None
        while self.step < len(self):
            try:
                iterator = iterator or self._start(self.epoch, self.step)
                batch = next(iterator)[0]
            except RuntimeError as error:  # DALI stops on a file that broke after the scan
                self._recover(error)
                iterator = None
                continue
            self.step += 1
            self._live = (self.epoch, self.step, iterator) if self.step < len(self) else None
            yield (batch["view1"].to(self.device, non_blocking=True),
                   batch["view2"].to(self.device, non_blocking=True))

    def _recover(self, error: RuntimeError) -> None:
        """Re-checks this epoch's files and substitutes each broken one by the next usable file of the
        list (as the torch backend does); re-raises `error` when none is broken."""
        self._live = None
        log.warning("DALI pipeline failed in epoch %d at step %d (%s); re-checking this epoch's %d files",
                    self.epoch, self.step, " ".join(str(error).split())[:300], self.shard.per_rank)
        indices = sorted({int(i) for i in self.shard.order(self.epoch)})
        with _check_threads() as pool:
            reasons = list(pool.map(lambda i: _why_unusable(self.files[i]), indices))
        broken = {i: reason for i, reason in zip(indices, reasons) if reason is not None}
        if not broken:
            raise error
        self._substitute(broken)

    def _substitute(self, broken: dict[int, str]) -> None:
        """Each broken file (index: why) is replaced by the next usable file of the list, as the torch
        backend does (logged, counted in `substituted`, listed in `skipped`)."""
        for index, reason in broken.items():
            note_failed(self, [(self.files[index], reason)])
            self.files[index] = self.files[self._next_usable(index, broken)]

    def _next_usable(self, index: int, broken: dict) -> int:
        n = len(self.files)
        for j in (k % n for k in range(index + 1, index + n)):
            if j not in broken and _why_unusable(self.files[j]) is None:
                return j
        raise RuntimeError(f"no usable image left in {self.num_images} files; the data folder changed since the scan")

