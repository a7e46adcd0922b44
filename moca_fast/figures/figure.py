"""What every figure shares: a matplotlib Figure on the Agg canvas (no display, no pyplot state), a title that
names the source and step, the token grid at the image's resolution, and an atomic PNG write.

A figure's size in pixels is its size in inches (set from the number of panels, see each module) times DPI:
nothing is cropped when saving (no bbox_inches="tight"), so the size is known before drawing.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moca_fast.errors import ConfigError
from moca_fast.output_files import atomic_file

DPI = 100
PANEL = 2.0  # inches per image panel
TITLE_SIZE = 9
SUPTITLE_SIZE = 11


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of width x height inches with constrained layout, drawn by Agg."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def set_title(fig: Figure, text: str) -> None:
    """fig.suptitle, each line wrapped to the figure's width: a long source path would run off its edges."""
    per_line = max(20, int(fig.get_figwidth() * 72 / (0.62 * SUPTITLE_SIZE)))  # DejaVu Sans: ~0.6 em a character
    wrapped = "\n".join(textwrap.fill(line, per_line) for line in text.split("\n"))
    fig.suptitle(wrapped, fontsize=SUPTITLE_SIZE)


def where(source: str, step: int | None) -> str:
    """"<source>, step N" (the step when the source records one)."""
    return source if step is None else f"{source}, step {step}"


def upsample(grid: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """Token grids [..., g, g] -> [..., size, size] by nearest neighbour: each token covers its patch of the image."""
    t = torch.as_tensor(np.asarray(grid))
    flat = t.reshape(-1, 1, *t.shape[-2:]).float()
    out = F.interpolate(flat, size=(size, size), mode="nearest")
    return out.reshape(*t.shape[:-2], size, size).to(t.dtype).numpy()


def image_axis(ax, title: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=TITLE_SIZE)


def short_name(path: str, limit: int = 24) -> str:
    name = os.path.basename(path)
    return name if len(name) <= limit else name[: limit - 3] + "..."


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Writes fig as a PNG through moca_fast.output_files.atomic_file: a reader (or a signal, or a crash) never
    sees a partial file. An unwritable path is a ConfigError naming it."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=fig.dpi)
    except OSError as e:
        raise ConfigError(f"--output {path}: cannot write the figure ({e.strerror or e})") from None
    return path
