"""The PCA figure of the teacher's patch tokens as RGB (what it shows and how: moca_fast.viz.pca, the command's
help)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import MinMaxScaler

from moca_fast.figures.figure import PANEL, image_axis, new_figure, set_title, short_name, upsample
from moca_fast.figures.images import Images

PAIRS_PER_ROW = 4
HEADER = 0.7  # inches for the title lines


@dataclass
class PcaMaps:
    """rgb: [N, S, S, 3] in [0, 1], the patches' colours at the image's resolution; first: [N, g, g] the first
    component; foreground: [N, S, S] bool or None; explained: [3] fraction of the variance of each component."""

    rgb: np.ndarray
    first: np.ndarray
    foreground: np.ndarray | None
    explained: np.ndarray
    threshold: float


def border_mask(grid: int) -> np.ndarray:
    border = np.ones((grid, grid), dtype=bool)
    border[1:-1, 1:-1] = False
    return border


def pca_maps(tokens: torch.Tensor, img_size: int, foreground: bool = False, threshold: float = 0.0) -> PcaMaps:
    """tokens [N, L, C] (L = g * g, row-major) -> the figure's arrays."""
    n, L, _ = tokens.shape
    grid = math.isqrt(L)
    pca = PCA(n_components=3, random_state=0)
    components = pca.fit_transform(tokens.reshape(n * L, -1).double().numpy())
    colours = MinMaxScaler().fit_transform(components).reshape(n, grid, grid, 3)
    rgb = np.moveaxis(upsample(np.moveaxis(colours, -1, 1), img_size), 1, -1)
    first = components[:, 0].reshape(n, grid, grid)
    mask = None
    if foreground:
        above = first > threshold
        if above[:, border_mask(grid)].mean() > 0.5:
            above = ~above
        mask = upsample(above, img_size)
    return PcaMaps(rgb, first, mask, pca.explained_variance_ratio_, threshold)


def draw(images: Images, maps: PcaMaps, title: str):
    """Per image: the image, its patch colours [, its foreground]; PAIRS_PER_ROW images per row."""
    n = len(images)
    panels = 2 if maps.foreground is None else 3
    per_row = min(n, PAIRS_PER_ROW)
    rows = math.ceil(n / per_row)
    fig = new_figure(per_row * panels * PANEL, rows * PANEL + HEADER)
    share = ", ".join(f"{100 * v:.0f} %" for v in maps.explained)
    set_title(fig, f"PCA of the teacher's patch tokens: {title}\n"
                   f"RGB = components 1, 2, 3 ({share} of the variance), one PCA over the {maps.first.size} patches "
                   f"of these {n} images")
    axes = fig.subplots(rows, per_row * panels, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        row = axes[i // per_row, (i % per_row) * panels:(i % per_row + 1) * panels]
        label = short_name(images.files[i]) + (f" ({images.classes[i]})" if images.classes[i] else "")
        row[0].imshow(images.pixels[i].numpy(), interpolation="nearest")
        row[1].imshow(maps.rgb[i], interpolation="nearest")
        image_axis(row[0], label)
        image_axis(row[1], "components 1-3")
        if maps.foreground is not None:
            row[2].imshow(maps.foreground[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            image_axis(row[2], "foreground (white)")
        for ax in row:
            ax.set_axis_on()
    return fig
