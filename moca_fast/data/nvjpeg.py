"""The GPU-decoding backend without DALI: torchvision's nvJPEG decoder, batched on the device.

The loader's workers read each file's bytes and its header (no decoding), draw the sample's choices exactly as
the torch backend does (transforms.sample_views from sample_rng(seed, epoch, global position)) and hand over the
encoded JPEG. The main process decodes the batch's JPEGs at once on the loader's device
(torchvision.io.decode_jpeg, nvJPEG on a GPU; on the CPU the same code decodes with libjpeg, which is how it is
tested), crops each view's window, resizes it (bilinear, antialiased: torch's counterpart of PIL's filter),
flips it, and applies the photometric operations batched (moca_fast.data.photometric). Files that are not
RGB or greyscale JPEGs (PNG, CMYK JPEG, ...) are decoded, cropped and flipped in the workers as on the split
path (moca_fast.data.split_views). A JPEG the device decoder rejects is decoded with PIL from the same bytes;
one that PIL cannot decode either (changed since the scan) is replaced by the batch's next sample, logged and
counted as a substitution.

The views differ from the PIL path's by the decoder (nvJPEG's IDCT and chroma upsampling) and the resize
filter's arithmetic: within a few grey levels, not bit for bit.
"""
from __future__ import annotations

import io
import logging

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from moca_fast.data.image_list import ImageList
from moca_fast.data.photometric import pack_params
from moca_fast.data.scan import printable, to_rgb
from moca_fast.data.split_views import CropFlipTwoViews
from moca_fast.data.torch_backend import TorchTwoViewLoader
from moca_fast.data.transforms import VIEWS, sample_views, to_uint8_tensor

log = logging.getLogger("moca_fast.data")

DEVICE_DECODED_MODES = ("RGB", "L")


class EncodedTwoViews:
    """Image file + per-sample generator -> (encoded JPEG uint8 [n] (empty when decoded here), views uint8
    [2, 3, S, S] (zeros for a JPEG), parameters float64 [2, P], geometry int64 [2, 5]: top, left, h, w, flip)."""

    def __init__(self, img_size: int, crop_min: float):
        self.img_size, self.crop_min = img_size, crop_min
        self.decode_here = CropFlipTwoViews(img_size, crop_min)

    def __call__(self, path: str, rng):
        with open(path, "rb") as f:
            data = f.read()
        header = Image.open(io.BytesIO(data))
        if header.format != "JPEG" or header.mode not in DEVICE_DECODED_MODES:
            view1, view2, params = self.decode_here(path, rng)
            return torch.empty(0, dtype=torch.uint8), torch.stack([view1, view2]), params, torch.zeros(2, 5).long()
        views = sample_views(rng, header.width, header.height, self.crop_min, VIEWS)
        geometry = torch.tensor([[*v.crop, int(v.flip)] for v in views], dtype=torch.int64)
        ready = torch.zeros(2, 3, self.img_size, self.img_size, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), ready, torch.stack(
            [pack_params(v) for v in views]), geometry


def collate_encoded(samples):
    """-> (encoded: list of B uint8 [n], views [B, 2, 3, S, S], params [B, 2, P], geometry [B, 2, 5], failed)."""
    encoded, views, params, geometry, failed = zip(*samples)
    return (list(encoded), default_collate(list(views)), default_collate(list(params)),
            default_collate(list(geometry)), [bad for fails in failed for bad in fails])


def resized_crop(image: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> the window resized to uint8 [3, size, size], bilinear with antialiasing, rounded."""
    window = image[:, top:top + h, left:left + w].unsqueeze(0).to(torch.float32)
    resized = F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


class NvjpegTwoViewLoader(TorchTwoViewLoader):
    """Yields (x1, x2): float32 [B, 3, S, S] on `device`; the JPEGs decoded there (module docstring)."""

    backend = "nvjpeg"

    def __init__(self, images: ImageList, cfg, rank: int, world_size: int, device):
        super().__init__(images, cfg.replace(photometric_on="device"), rank, world_size, device,
                         read_views=EncodedTwoViews(cfg.img_size, cfg.crop_min), collate=collate_encoded)
        self.img_size = cfg.img_size

    def __iter__(self):
        for encoded, ready, params, geometry, _ in self.host_batches():
            views = self._decode_crop_flip(encoded, ready.to(self.device, non_blocking=True), geometry)
            yield tuple(self._normalize(self._photometric(views[:, k], params[:, k])) for k in range(2))

    def _decode_crop_flip(self, encoded: list, views: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """views uint8 [B, 2, 3, S, S] on the device, the JPEG samples' filled in from their decoded images."""
        rows = [i for i, data in enumerate(encoded) if data.numel()]
        images = self._decode([encoded[i] for i in rows])
        broken = []
        for i, image in zip(rows, images):
            if image is None:
                broken.append(i)
                continue
            for k in range(2):
                top, left, h, w, flip = geometry[i, k].tolist()
                view = resized_crop(image, top, left, h, w, self.img_size)
                views[i, k] = view.flip(-1) if flip else view
        good = [i for i in range(len(encoded)) if i not in broken]
        if not good:
            raise RuntimeError(f"none of the {len(encoded)} images of a batch decodes; the data folder changed since "
                               f"it was scanned")
        for i in broken:  # the batch's next good sample in its place: a fixed choice, counted
            views[i] = views[next((j for j in good if j > i), good[0])]
        return views

    def _decode(self, encoded: list) -> list:
        """Decoded uint8 [3, H, W] on the device per JPEG; None for one that neither decoder reads."""
        if not encoded:
            return []
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return [self._decode_one(data) for data in encoded]

    def _decode_one(self, data: torch.Tensor):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            return to_uint8_tensor(to_rgb(Image.open(io.BytesIO(data.numpy().tobytes())))).to(self.device)
        except Exception as e:  # noqa: BLE001 - a file changed since the scan: substituted and counted
            log.warning("a JPEG of the batch no longer decodes (%s); substituted by the batch's next image",
                        printable(" ".join(str(e).split())))
            self.substituted += 1
            return None
