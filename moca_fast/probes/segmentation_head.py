"""A linear segmentation probe on a ViT's patch tokens, and sliding-window inference.

Features (DenseFeatures):
  last   the final block's tokens after the encoder's final LayerNorm, [CLS] dropped: [B, C, g, g]
         (Segmenter's linear decoder reads these);
  last4  the last four blocks' tokens (all, in a shallower encoder), each through the final LayerNorm,
         concatenated: [B, 4C, g, g]
         (DINOv2's linear head, "+ms" variant; iBOT's linear head likewise).
Head (LinearHead): a 1x1 convolution (a Linear per token), preceded by BatchNorm for `last4` as DINOv2's
BNHead does; weights trunc-normal std 0.02, bias 0 (Segmenter). Its logits are upsampled bilinearly to the
input's resolution. Frozen (the linear probe), the encoder runs under no_grad, in bf16 autocast on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = ("last", "last4")
INIT_STD = 0.02


class DenseFeatures(nn.Module):
    """x [B, 3, w, w] -> patch features [B, D, g, g] fp32 (D = C for `last`, 4C for `last4`)."""

    def __init__(self, encoder: nn.Module, features: str = "last", frozen: bool = True):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features {features!r} is not one of {', '.join(FEATURES)}")
        self.encoder, self.features, self.frozen = encoder, features, frozen
        self._kept: list[torch.Tensor] = []

    @property
    def dim(self) -> int:
        layers = len(self.encoder.blocks[-4:]) if self.features == "last4" else 1
        return self.encoder.norm.normalized_shape[0] * layers

    def _keep_output(self, module, inputs, output) -> None:
        self._kept.append(output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen), \
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            if self.features == "last4":  # hooks only for this forward: probes may share an encoder
                hooks = [block.register_forward_hook(self._keep_output) for block in self.encoder.blocks[-4:]]
                try:
                    self.encoder(x)
                finally:
                    for hook in hooks:
                        hook.remove()
                tokens = torch.cat([self.encoder.norm(t) for t in self._kept], dim=-1)
                self._kept = []
            else:
                _, tokens = self.encoder(x)
        tokens = tokens[:, 1:].float()
        grid = int(round(tokens.shape[1] ** 0.5))
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)


class LinearHead(nn.Module):
    """Patch features [B, D, g, g] -> logits [B, K, H, W] at `size` (H, W), bilinear."""

    def __init__(self, dim: int, num_classes: int, batch_norm: bool):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.classifier.weight, std=INIT_STD)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(feats))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationProbe(nn.Module):
    """Image windows [B, 3, w, w] -> logits [B, K, w, w]: DenseFeatures then LinearHead."""

    def __init__(self, encoder: nn.Module, num_classes: int, features: str = "last", frozen: bool = True):
        super().__init__()
        self.features = DenseFeatures(encoder, features, frozen)
        self.head = LinearHead(self.features.dim, num_classes, batch_norm=features == "last4")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), x.shape[-2:])


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of the windows covering 0..length (mmsegmentation's slide_inference): every `stride`, the last
    one flush with the end; one window at 0 when length <= window."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, max(length - window, 0)) for i in range(count)})


@torch.no_grad()
def slide_inference(predict, images: torch.Tensor, window: int, stride: int, num_classes: int,
                    max_batch: int = 32) -> torch.Tensor:
    """Logits [B, K, H, W] of images [B, 3, H, W]: predict(windows [n, 3, w, w]) -> [n, K, w, w] on every
    window (at most max_batch at a time), the overlaps averaged. An image smaller than the window is padded
    with zeros (the mean colour after normalisation) at its bottom and right, and the result cropped back."""
    b, _, h, w = images.shape
    padded = F.pad(images, (0, max(window - w, 0), 0, max(window - h, 0)))
    ph, pw = padded.shape[-2:]
    boxes = [(n, y, x) for n in range(b) for y in window_starts(ph, window, stride)
             for x in window_starts(pw, window, stride)]
    total = images.new_zeros(b, num_classes, ph, pw, dtype=torch.float32)
    count = images.new_zeros(b, 1, ph, pw, dtype=torch.float32)
    for start in range(0, len(boxes), max_batch):
        chunk = boxes[start:start + max_batch]
        crops = torch.stack([padded[n, :, y:y + window, x:x + window] for n, y, x in chunk])
        logits = predict(crops).float()
        for (n, y, x), out in zip(chunk, logits):
            total[n, :, y:y + window, x:x + window] += out
            count[n, :, y:y + window, x:x + window] += 1
    return (total / count)[:, :, :h, :w]
