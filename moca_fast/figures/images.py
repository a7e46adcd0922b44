"""The images a figure shows, as the teacher sees them, and the teacher's final patch tokens of them.

Inputs: image files (each used), folders (class sub-folders or flat, scanned as training scans them; up to
--num-images taken round-robin over the classes: the first image of each class, then the second, ...), or
`--data demo` (the demo's held-out digits) / `--data DIR` (DIR/val when it exists, else DIR).
Every image goes through the evaluation transform (resize, centre crop to img_size), so a figure's pixels are
the teacher's input pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moca_fast.data.scan import ImageList, check_image, open_rgb, scan_images
from moca_fast.data.transforms import EvalTransform, Normalizer
from moca_fast.errors import ConfigError


@dataclass
class Images:
    """files[i] (with its class name, "" when unknown) and its pixels: uint8 [N, S, S, 3]."""

    files: list[str]
    classes: list[str]
    pixels: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)

    def normalized(self, device) -> torch.Tensor:
        """The teacher's input: float32 [N, 3, S, S], ImageNet-normalised, on `device`."""
        return Normalizer(device)(self.pixels.permute(0, 3, 1, 2))


def round_robin(images: ImageList, n: int) -> list[int]:
    """Indices of up to n images: the first of each class, then the second of each class, ..."""
    per_class: dict[int, list[int]] = {}
    for i, label in enumerate(images.labels):
        per_class.setdefault(label, []).append(i)
    order = [members[depth] for depth in range(max(map(len, per_class.values())))
             for members in per_class.values() if depth < len(members)]
    return order[:n]


def _picked(images: ImageList, n: int) -> list[tuple[str, str]]:
    named = len(images.classes) > 1
    return [(images.files[i], images.classes[images.labels[i]] if named else "") for i in round_robin(images, n)]


def find_images(paths: list[str], data: str | None, n: int) -> list[tuple[str, str]]:
    """(file, class name) of the requested images; ConfigError (one line naming the path) when there are none or
    a named file is not a usable image."""
    found: list[tuple[str, str]] = []
    if data is not None:
        found += _picked(scan_images(data_folder(data)), n)
    for path in paths:
        if os.path.isdir(path):
            found += _picked(scan_images(path), n)
        elif os.path.isfile(path):
            problem = check_image(path)
            if problem is not None:
                raise ConfigError(f"{path}: {problem}")
            found.append((os.path.abspath(path), ""))
        else:
            raise ConfigError(f"{path}: no such image file or folder")
    if not found:
        raise ConfigError("no images: give image files or folders, or --data demo")
    return found


def data_folder(data: str) -> str:
    """The held-out images of --data: the demo's val/ digits for "demo", DIR/val when it exists, else DIR."""
    if data == "demo":
        from moca_fast.data.demo import prepare_demo

        return prepare_demo().knn_val
    if not os.path.isdir(data):
        raise ConfigError(f"--data {data}: no such folder (give an image folder or 'demo')")
    val = os.path.join(data, "val")
    return val if os.path.isdir(val) else data


def load_images(found: list[tuple[str, str]], img_size: int) -> Images:
    transform = EvalTransform(img_size)
    pixels = torch.stack([transform(open_rgb(f)).permute(1, 2, 0) for f, _ in found])
    return Images([f for f, _ in found], [c for _, c in found], pixels)


@torch.no_grad()
def patch_tokens(tokens_fn, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """tokens_fn (a batch [B, 3, S, S] -> the teacher's final patch tokens [B, L, C]) over x [N, 3, S, S] in
    batches -> [N, L, C] fp32."""
    return torch.cat([tokens_fn(x[start:start + batch_size]).float() for start in range(0, x.shape[0], batch_size)])


def encoder_tokens(encoder):
    """tokens_fn of a bare teacher encoder, as the evaluation commands run it (bf16 autocast on a GPU):
    the final tokens after its last LayerNorm, [CLS] dropped, before any pooling."""
    from moca_fast.io.teacher import TeacherTokens

    tokens = TeacherTokens(encoder)
    return lambda x: tokens(x)[1][:, 1:]
