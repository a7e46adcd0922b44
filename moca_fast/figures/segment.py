"""The segmentation figure: validation images, their ground truth and a probe's predictions, and the per-class
IoU (what it shows: moca_fast.viz.segment, the command's help). Draws from arrays; reads no file."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Patch

from moca_fast.data.segmentation import IGNORE
from moca_fast.figures.figure import PANEL, TITLE_SIZE, image_axis, new_figure, set_title

IGNORED_COLOUR = (0.25, 0.25, 0.25)
BAR_HEIGHT = 0.18  # inches per class in the IoU chart
HEADER = 0.7


def class_colours(num_classes: int) -> np.ndarray:
    """[256, 3] floats: class c -> tab20 colour c mod 20, IGNORE -> dark grey."""
    table = np.tile(np.asarray(IGNORED_COLOUR), (256, 1))
    tab = np.asarray(colormaps["tab20"].colors)
    table[:num_classes] = tab[np.arange(num_classes) % len(tab)]
    return table


def draw(meta: dict, items: list):
    """meta: classes, names, miou, pixel_accuracy, iou {class: percent or None}, source; items: [(image uint8
    [H, W, 3], labels uint8 [H, W] with IGNORE, prediction uint8 [H, W])]."""
    classes = meta["classes"]
    colours = class_colours(len(classes))
    rows = max(1, len(items))
    chart = max(2.0, BAR_HEIGHT * len(classes))
    fig = new_figure(3 * PANEL + 3.2, max(rows * PANEL, chart) + HEADER)
    set_title(fig, f"Segmentation probe: {meta['source']}\nmIoU {meta['miou']:.1f} %, pixel accuracy "
                   f"{meta['pixel_accuracy']:.1f} % on the validation set")
    grid = fig.add_gridspec(rows, 4, width_ratios=[1, 1, 1, 1.6])
    shown = set()
    for r, (image, labels, pred) in enumerate(items):
        name = meta["names"][r]
        for c, (panel, title) in enumerate(((image, name), (colours[labels], "ground truth"),
                                             (colours[pred], "prediction"))):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(panel, interpolation="nearest")
            image_axis(ax, title)
        shown |= {int(v) for v in np.unique(labels) if v != IGNORE} | {int(v) for v in np.unique(pred)}
    bars = fig.add_subplot(grid[:, 3])
    iou = [meta["iou"][name] for name in classes]
    bars.barh(range(len(classes)), [v or 0.0 for v in iou], color=colours[:len(classes)])
    bars.set_yticks(range(len(classes)), [f"{n} ({'-' if v is None else f'{v:.0f}'})" for n, v in
                                          zip(classes, iou)], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(0, 100)
    bars.set_xlabel("IoU (%) on the validation set", fontsize=8)
    bars.set_title("per-class IoU", fontsize=TITLE_SIZE)
    bars.tick_params(axis="x", labelsize=7)
    if len(shown) <= 20:
        fig.legend(handles=[Patch(color=colours[c], label=classes[c]) for c in sorted(shown)],
                   loc="outside lower center", ncols=min(6, len(shown)), fontsize=7)
    return fig
