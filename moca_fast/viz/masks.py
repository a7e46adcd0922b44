"""The student's two masking rounds of one image (the first one given), as a training step draws them.

The masks come from the training's generator (moca_fast.model.masks.make_two_complementary_masks) with the
source's config: round 1's encoder sees len_keep[0] tokens and its decoder predicts codes at len_dec[0]
positions; round 2's encoder sees len_keep[1] tokens, all outside round 1's decoder positions, and its decoder
shares round 1's extra positions (at ViT-B/16: 88 and 49 visible tokens, 127 and 88 decoder positions).
Panels: the image; each round (the encoder's tokens as the image, the decoder-only positions and the unused
tokens as colours); both rounds together. Only the config is read: a --preset alone builds no model.

python -m moca_fast.viz masks --preset vit_base_dec2 IMAGE [--seed 0]
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from moca_fast.config import Config, load_config
from moca_fast.figures.figure import PANEL, image_axis, new_figure, set_title, short_name, upsample, where
from moca_fast.figures.images import find_images, load_images
from moca_fast.io.teacher import load_teacher
from moca_fast.model.masks import make_two_complementary_masks
from moca_fast.viz import cli

# round panels: what a token is in that round (the encoder's tokens show the image)
ENCODER, DECODER_ONLY, UNUSED = 0, 1, 2
ROUND_COLOURS = {DECODER_ONLY: (1.0, 0.55, 0.0, 0.85), UNUSED: (0.25, 0.25, 0.25, 0.92)}
# the "both rounds" panel: index -> colour (round 1 encoder, round 2 encoder, decoder-only in both, neither)
BOTH_COLOURS = ((0.12, 0.47, 0.71, 0.85), (0.84, 0.15, 0.16, 0.85), ROUND_COLOURS[DECODER_ONLY],
                ROUND_COLOURS[UNUSED])
HEADER = 0.6
LEGEND_HEIGHT = 0.9


@dataclass
class RoundMasks:
    """rounds: two [g, g] maps of ENCODER / DECODER_ONLY / UNUSED; both: [g, g] index into BOTH_COLOURS."""

    rounds: list[np.ndarray]
    both: np.ndarray
    len_keep: tuple[int, int]
    len_dec: tuple[int, int]


def round_masks(cfg: Config, seed: int) -> RoundMasks:
    """One image's pair of rounds from the training's mask generator, seeded."""
    grid, L = cfg.grid_size, cfg.num_patches
    ids = make_two_complementary_masks(1, L, cfg.len_keep(), cfg.len_dec(),
                                       generator=torch.Generator().manual_seed(seed))
    rounds = []
    for ids_shuffle, keep, dec in zip(ids, cfg.len_keep(), cfg.len_dec()):
        kind = np.full(L, UNUSED)
        kind[ids_shuffle[0, :dec].numpy()] = DECODER_ONLY
        kind[ids_shuffle[0, :keep].numpy()] = ENCODER
        rounds.append(kind.reshape(grid, grid))
    both = np.full((grid, grid), 3)
    both[(rounds[0] == DECODER_ONLY) & (rounds[1] == DECODER_ONLY)] = 2
    both[rounds[1] == ENCODER] = 1
    both[rounds[0] == ENCODER] = 0
    return RoundMasks(rounds, both, cfg.len_keep(), cfg.len_dec())


def _grid_lines(ax, size: int, patch: int) -> None:
    ticks = np.arange(0, size + 1, patch) - 0.5
    ax.set_xticks(ticks, minor=True)
    ax.set_yticks(ticks, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.3, alpha=0.6)
    ax.tick_params(which="minor", length=0)


def draw(pixels: np.ndarray, name: str, masks: RoundMasks, title: str, patch: int):
    size = pixels.shape[0]
    L = masks.both.size
    fig = new_figure(4 * PANEL, PANEL + HEADER + LEGEND_HEIGHT)
    grid = masks.both.shape[0]
    set_title(fig, f"Masking rounds of a training step: {title}\n{L} tokens ({grid} x {grid} patches of {patch} "
                   f"pixels), drawn by the training's mask generator")
    axes = fig.subplots(1, 4)
    axes[0].imshow(pixels, interpolation="nearest")
    image_axis(axes[0], name)
    for r, kind in enumerate(masks.rounds):
        ax = axes[1 + r]
        ax.imshow(pixels, interpolation="nearest")
        hidden = np.ma.masked_equal(upsample(kind, size), ENCODER)
        ax.imshow(hidden, cmap=ListedColormap(list(ROUND_COLOURS.values())), vmin=DECODER_ONLY, vmax=UNUSED,
                  interpolation="nearest")
        image_axis(ax, f"round {r + 1}\nencoder {masks.len_keep[r]}, decoder {masks.len_dec[r]}")
        _grid_lines(ax, size, patch)
    axes[3].imshow(pixels, interpolation="nearest")
    axes[3].imshow(upsample(masks.both, size), cmap=ListedColormap(BOTH_COLOURS), vmin=0, vmax=3,
                   interpolation="nearest")
    image_axis(axes[3], "both rounds\n")
    _grid_lines(axes[3], size, patch)
    n1, n2, shared, neither = np.bincount(masks.both.ravel(), minlength=4)
    legend = [Patch(facecolor="none", edgecolor="black", label="a round's encoder-visible token (image shown)"),
              Patch(color=BOTH_COLOURS[0], label=f"round 1 encoder ({n1})"),
              Patch(color=BOTH_COLOURS[1], label=f"round 2 encoder ({n2})"),
              Patch(color=BOTH_COLOURS[2], label=f"decoder-only position (a mask token), both rounds ({shared})"),
              Patch(color=BOTH_COLOURS[3], label=f"not used by the round (by neither: {neither})")]
    fig.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=7)
    return fig


def figure(argv: list[str]):
    """(the figure, a summary line, the parsed flags) of the command line argv."""
    p = cli.parser("masks", __doc__, num_images=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the mask draw (default 0)")
    args = p.parse_args(argv)
    found = find_images(args.images, args.data, 1)[:1]
    if args.checkpoint is None and args.preset is not None:  # the config alone: no model to build
        cfg, source, step = load_config(args.preset), f"preset {args.preset}", None
    else:
        teacher = load_teacher(args.checkpoint, args.preset, "cpu")
        cfg, source, step = teacher.cfg, teacher.source, teacher.step
    images = load_images(found, cfg.img_size)
    masks = round_masks(cfg, args.seed)
    name = short_name(images.files[0]) + (f" ({images.classes[0]})" if images.classes[0] else "")
    fig = draw(images.pixels[0].numpy(), name, masks, f"{where(source, step)}, seed {args.seed}", cfg.patch_size)
    summary = (f"masks of one step: encoder {masks.len_keep[0]} and {masks.len_keep[1]} tokens, decoder "
               f"{masks.len_dec[0]} and {masks.len_dec[1]} positions of {masks.both.size}")
    return fig, summary, args


def main(argv: list[str] | None = None) -> int:
    return cli.run(figure, argv)


if __name__ == "__main__":
    sys.exit(main())
