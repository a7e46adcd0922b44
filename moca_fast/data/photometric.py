"""The views' photometric operations, batched on the device with per-sample parameters (the split pipeline).

The loader's workers decode, crop, resize and flip (moca_fast.data.transforms.crop_and_flip) and ship uint8;
`Photometric` then applies each sample's colour jitter (in its own order), grayscale, Gaussian blur and
solarize to the whole batch at once, on any device (CPU tensors too). The parameters are the ones
transforms.sample_views drew on the host for that sample, packed per view by `pack_params`, so a batch stays
a fixed function of (seed, epoch, global position of the sample).

Every operation reproduces the arithmetic of torchvision's PIL path (the reference, transforms.apply_view):
  brightness, contrast, saturation  PIL's Image.blend in float32, truncated to uint8 (clamped when extrapolating);
                                    contrast around int(mean luma + 0.5), saturation towards the luma
  luma                              PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16
  hue                               PIL's 8-bit HSV round trip (rgb2hsv / hsv2rgb in libImaging/Convert.c, with
                                    its float/double mix), H shifted by int(hue * 255) modulo 256
  Gaussian blur                     PIL's GaussianBlur: 3 passes of an extended box blur per axis (BoxBlur.c),
                                    8.24 fixed-point weights, edges repeated, rounded to uint8 after each pass
  solarize                          ImageOps.solarize(128)
Flipping before these operations (in the workers) gives the same result as flipping after them: each is
pointwise, uses the whole image's mean (contrast) or a symmetric window (blur).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from moca_fast.data.transforms import SOLARIZE_THRESHOLD, ViewParams

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
BLUR_PASSES = 3
#: one view's parameters as columns of a float64 [B, len(COLUMNS)] tensor (every value exact in float64)
COLUMNS = ("jitter", "order0", "order1", "order2", "order3", "brightness", "contrast", "saturation", "hue_shift",
           "grayscale", "blur", "blur_radius", "blur_ww", "blur_fw", "solarize")
_COL = {name: i for i, name in enumerate(COLUMNS)}
_FIXED_ONE = 1 << 24


def box_blur_weights(radius: float) -> tuple[int, int, int]:
    """PIL's GaussianBlur(radius) as one box-blur pass: (integer box radius, weight of the inner taps, weight of
    the two far taps), both weights in 8.24 fixed point; float32 and double steps as in BoxBlur.c."""
    f32 = np.float32
    r = f32(radius)
    sigma2 = f32(r * r / f32(BLUR_PASSES))
    length = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    low = f32(math.floor((float(length) - 1.0) / 2.0))
    a = f32((f32(2) * low + f32(1)) * (low * (low + f32(1)) - f32(3) * sigma2))
    a = f32(a / (f32(6) * (sigma2 - (low + f32(1)) * (low + f32(1)))))
    box = f32(low + a)
    inner = int(box)
    ww = int(f32(_FIXED_ONE) / (box * f32(2) + f32(1)))
    fw = (_FIXED_ONE - (inner * 2 + 1) * ww) // 2
    return inner, ww, fw


def pack_params(params: ViewParams) -> torch.Tensor:
    """One view's photometric choices -> float64 [len(COLUMNS)]."""
    row = dict.fromkeys(COLUMNS, 0.0)
    row.update(brightness=1.0, contrast=1.0, saturation=1.0)
    if params.jitter:
        row["jitter"] = 1.0
        for slot, (name, factor) in enumerate(params.jitter):
            row[f"order{slot}"] = float(JITTER_OPS.index(name))
            if name == "hue":
                row["hue_shift"] = float(int(np.int32(factor * 255).astype(np.uint8)))  # torchvision's cast
            else:
                row[name] = factor
    row["grayscale"] = float(params.grayscale)
    if params.blur_radius is not None:
        row["blur"] = 1.0
        row["blur_radius"], row["blur_ww"], row["blur_fw"] = map(float, box_blur_weights(params.blur_radius))
    row["solarize"] = float(params.solarize)
    return torch.tensor([row[name] for name in COLUMNS], dtype=torch.float64)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast over [B, C, H, W]."""
    return values.view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> int32 [B, 1, H, W], PIL's convert("L")."""
    x = x.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + (1 << 15)) >> 16


def blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor) per sample: uint8 [B, 3, H, W]; factor float32 [B]."""
    deg = degenerate.to(torch.float32)
    out = deg + _per_sample(factor) * (x.to(torch.float32) - deg)
    return out.clamp_(0, 255).to(torch.uint8)  # the cast truncates, as PIL's (UINT8) does


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.zeros((), device=x.device), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = luma(x).to(torch.float64).mean(dim=(1, 2, 3))
    return blend(x, _per_sample(torch.floor(mean + 0.5)), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> HSV, H + shift modulo 256, HSV -> RGB; uint8 [B, 3, H, W], shift [B] in 0..255."""
    f32, f64 = torch.float32, torch.float64
    rgb = x.to(torch.int32)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    maxc, minc = rgb.amax(dim=1), rgb.amin(dim=1)
    grey = maxc == minc
    cr = (maxc - minc).to(f32).clamp_(min=1)
    s = (cr / maxc.to(f32).clamp(min=1)).to(f64)
    rc, gc, bc = ((maxc - c).to(f32) / cr for c in (r, g, b))
    h = torch.where(r == maxc, bc - gc, torch.where(g == maxc, (2.0 + rc.to(f64) - bc.to(f64)).to(f32),
                                                    (4.0 + gc.to(f64) - rc.to(f64)).to(f32)))
    h = torch.fmod(h.to(f64) / 6.0 + 1.0, 1.0).to(f32)
    hue = torch.where(grey, 0, (h.to(f64) * 255.0).to(torch.int32).clamp_(0, 255))
    sat = torch.where(grey, 0, (s * 255.0).to(torch.int32).clamp_(0, 255))
    hue = (hue + shift.view(-1, 1, 1).to(torch.int32)) % 256
    pos = hue.to(f64) * 6.0 / 255.0
    sector = torch.floor(pos)
    frac = (pos - sector).to(f32).to(f64)
    fs = (sat.to(f64) / 255.0).to(f32).to(f64)
    v = maxc.to(f64)
    fs_frac = (fs * frac).to(f32).to(f64)  # float * float in C
    p, q, t = (torch.floor(v * w + 0.5).clamp_(0, 255) for w in (1.0 - fs, 1.0 - fs_frac, 1.0 - fs * (1.0 - frac)))
    sector = sector.to(torch.int64) % 6

    def pick(*by_sector):  # the value of each pixel's sector: by_sector[k] for sector k
        out = by_sector[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, by_sector[k], out)
        return out

    out = torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], dim=1)
    return torch.where((sat == 0).unsqueeze(1), v.unsqueeze(1), out).to(torch.uint8)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return luma(x).to(torch.uint8).expand_as(x)


def _box_blur_pass(x: torch.Tensor, radius: torch.Tensor, ww: torch.Tensor, fw: torch.Tensor, reach: int,
                   dim: int) -> torch.Tensor:
    """One pass of PIL's box blur along `dim` of int64 [B, C, H, W]: taps within the integer radius weigh ww,
    the two next ones fw, edges repeated, rounded to integers; reach = the largest radius + 1."""
    size = x.shape[dim]
    index = torch.arange(-reach, size + reach, device=x.device).clamp_(0, size - 1)
    padded = x.index_select(dim, index)
    out = torch.zeros_like(x)
    for offset in range(-reach, reach + 1):
        weight = torch.where(radius >= abs(offset), ww, torch.where(radius + 1 == abs(offset), fw, 0))
        out += _per_sample(weight) * padded.narrow(dim, reach + offset, size)
    return (out + (1 << 23)) >> 24


def gaussian_blur(x: torch.Tensor, radius: torch.Tensor, ww: torch.Tensor, fw: torch.Tensor) -> torch.Tensor:
    """PIL's GaussianBlur per sample; radius, ww, fw [B] on the CPU, from box_blur_weights."""
    reach = int(radius.max()) + 1
    radius, ww, fw = (_on(v, x).to(torch.int64) for v in (radius, ww, fw))
    y = x.to(torch.int64)
    for dim in (3, 2):
        for _ in range(BLUR_PASSES):
            y = _box_blur_pass(y, radius, ww, fw, reach, dim)
    return y.to(torch.uint8)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 255 - x, x)


class Photometric(torch.nn.Module):
    """uint8 [B, 3, H, W] views (any device) + float64 [B, len(COLUMNS)] parameters (pack_params) on the CPU ->
    uint8 [B, 3, H, W]: each sample's photometric operations, in the official order.

    The parameters stay on the host: which samples an operation applies to is known without a device sync, and
    each operation runs on those samples only."""

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        jitter = params[:, _COL["jitter"]] > 0
        for slot in range(len(JITTER_OPS)):
            for index, name in enumerate(JITTER_OPS):
                x = _apply(x, params, jitter & (params[:, _COL[f"order{slot}"]] == index), _JITTERS[name])
        x = _apply(x, params, params[:, _COL["grayscale"]] > 0, lambda y, _: grayscale(y))
        x = _apply(x, params, params[:, _COL["blur"]] > 0, lambda y, p: gaussian_blur(
            y, *(p[:, _COL[name]] for name in ("blur_radius", "blur_ww", "blur_fw"))))
        return _apply(x, params, params[:, _COL["solarize"]] > 0, lambda y, _: solarize(y))


def _on(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(x.device, non_blocking=True)


def _apply(x: torch.Tensor, params: torch.Tensor, mask: torch.Tensor, op) -> torch.Tensor:
    """x with op(samples, their parameters) in place of the samples where mask [B] (host) is set."""
    rows = mask.nonzero().flatten()
    if len(rows) == len(mask):
        return op(x, params)
    if len(rows) == 0:
        return x
    on_device = _on(rows, x)
    return x.index_copy(0, on_device, op(x.index_select(0, on_device), params[rows]))


def _blend_op(adjust, column: str):
    return lambda x, p: adjust(x, _on(p[:, _COL[column]], x).to(torch.float32))


_JITTERS = {"brightness": _blend_op(adjust_brightness, "brightness"),
            "contrast": _blend_op(adjust_contrast, "contrast"),
            "saturation": _blend_op(adjust_saturation, "saturation"),
            "hue": lambda x, p: adjust_hue(x, _on(p[:, _COL["hue_shift"]], x).to(torch.int32))}
