"""The DALI pipeline of the paper's two views: decoded and augmented on the GPU (nvJPEG), or on the CPU; fed
by moca_fast.data.dali's loader through an external source (the files and each view's choices, PARAMS).

One pipeline definition; the device is the only difference: on a GPU the decoder runs "mixed"
(nvJPEG) and every image op on the GPU, without one everything runs on the CPU (device_id=None).

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
"""
from __future__ import annotations

import itertools

import nvidia.dali.math as dmath
import numpy as np
from nvidia.dali import fn, pipeline_def, types

from moca_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, ViewParams

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
