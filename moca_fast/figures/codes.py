"""The codes figure: each patch coloured by its codebook word, its codes' entropy, the most used words with their
patches (what it shows and why: moca_fast.viz.codes, the command's help)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from moca_fast.figures.figure import TITLE_SIZE, image_axis, new_figure, set_title, short_name, upsample
from moca_fast.figures.images import Images
from moca_fast.model.codebook import OnlineCodebook
from moca_fast.reference_ops import assign_reference

OTHER_WORDS = (0.85, 0.85, 0.85, 1.0)
SHOWN_WORDS = 6  # rows of the "most used words" panel
PATCHES_PER_WORD = 8
HEADER = 0.8
MAP_PANEL = 1.6  # inches per image, word-map and entropy panel
PATCH_ROW = 0.75  # inches per row (and column) of the word patches
LABEL_WIDTH = 1.0
WORDS_TITLE = 0.6
LEGEND_WIDTH = 2.2  # inches right of the image columns for the legend and colour bar


@dataclass
class CodeMaps:
    """words / entropy / confidence: [N, g, g] per patch (argmax word, entropy in nats, the argmax's probability);
    ranking: word ids by use over all patches (most used first); uses: patches per word [K]."""

    words: np.ndarray
    entropy: np.ndarray
    confidence: np.ndarray
    ranking: np.ndarray
    uses: np.ndarray
    num_words: int
    dist_norm: float
    inv_temperature: float


@torch.no_grad()
def code_maps(tokens: torch.Tensor, codebook: OnlineCodebook) -> CodeMaps:
    """tokens [N, L, C] (teacher final patch tokens) -> the assignment's maps, with the codebook's sharpening."""
    n, L, _ = tokens.shape
    grid = math.isqrt(L)
    words = codebook.words.to(tokens.device)
    inv_temp = codebook.inv_temperature().to(tokens.device)
    codes, _, _ = assign_reference(tokens, words, inv_temp, codebook.interior.to(tokens.device))
    confidence, chosen = codes.max(dim=2)
    entropy = torch.special.entr(codes).sum(dim=2)
    uses = torch.bincount(chosen.flatten(), minlength=words.shape[0])
    ranking = torch.sort(uses, descending=True, stable=True).indices
    shape = (n, grid, grid)
    return CodeMaps(chosen.reshape(shape).cpu().numpy(), entropy.reshape(shape).cpu().numpy(),
                    confidence.reshape(shape).cpu().numpy(), ranking.cpu().numpy(), uses.cpu().numpy(),
                    words.shape[0], float(codebook.dist_norm_prev), float(inv_temp))


def word_colours(maps: CodeMaps) -> dict[int, tuple]:
    """The most used words -> the 18 colours of tab20 that are not grey (the other words: OTHER_WORDS)."""
    palette = [c for c in colormaps["tab20"].colors if len(set(c)) > 1]
    used = [int(w) for w in maps.ranking[:len(palette)] if maps.uses[w] > 0]
    return {w: (*palette[i], 1.0) for i, w in enumerate(used)}


def _word_image(maps: CodeMaps, i: int, colours: dict[int, tuple], size: int) -> np.ndarray:
    """[S, S, 4] the colours of image i's words."""
    index = {w: k + 1 for k, w in enumerate(colours)}  # 0: other words
    slots = np.vectorize(lambda w: index.get(int(w), 0))(maps.words[i])
    cmap = ListedColormap([OTHER_WORDS, *colours.values()])
    return cmap(upsample(slots, size))


def draw(images: Images, maps: CodeMaps, title: str, patch_size: int):
    n = len(images)
    size = images.pixels.shape[1]
    colours = word_colours(maps)
    word_rows = min(SHOWN_WORDS, int((maps.uses > 0).sum()))
    maps_height, words_height = 3 * MAP_PANEL, word_rows * PATCH_ROW + WORDS_TITLE
    fig = new_figure(max(n * MAP_PANEL + LEGEND_WIDTH, PATCHES_PER_WORD * PATCH_ROW + LABEL_WIDTH),
                     HEADER + maps_height + words_height)
    set_title(fig, f"Teacher codebook assignments: {title}\nK = {maps.num_words} words, sharpening "
                   f"inv_delta / dist_norm = {maps.inv_temperature:.3g} (dist_norm {maps.dist_norm:.3g}); "
                   f"{maps.words.size} patches use {int((maps.uses > 0).sum())} words")
    top, bottom = fig.subfigures(2, 1, height_ratios=[maps_height, words_height])
    axes = top.subplots(3, n, squeeze=False)
    entropy_max = max(float(maps.entropy.max()), 1e-6)
    for i in range(n):
        label = short_name(images.files[i], 14) + (f" ({images.classes[i]})" if images.classes[i] else "")
        axes[0, i].imshow(images.pixels[i].numpy(), interpolation="nearest")
        image_axis(axes[0, i], label)
        axes[1, i].imshow(_word_image(maps, i, colours, size), interpolation="nearest")
        image_axis(axes[1, i])
        shown = axes[2, i].imshow(upsample(maps.entropy[i], size), cmap="viridis", vmin=0, vmax=entropy_max,
                                  interpolation="nearest")
        image_axis(axes[2, i])
    axes[1, 0].set_ylabel("word (argmax)", fontsize=TITLE_SIZE)
    axes[2, 0].set_ylabel("entropy", fontsize=TITLE_SIZE)
    handles = [Patch(color=c, label=f"word {w}: {maps.uses[w]}") for w, c in colours.items()]
    others = maps.words.size - sum(maps.uses[w] for w in colours)
    handles.append(Patch(color=OTHER_WORDS, label=f"other words: {others}"))
    top.legend(handles=handles, loc="outside right upper", fontsize=7, ncols=2 if len(handles) > 11 else 1,
               title=f"patches per word (of {maps.words.size})", title_fontsize=7)
    bar = top.colorbar(shown, ax=axes[2, :].tolist(), location="right", fraction=0.05, pad=0.01)
    bar.set_label(f"entropy (nats; uniform: ln K = {math.log(maps.num_words):.2f})", fontsize=7)
    _draw_top_words(bottom, images, maps, colours, patch_size, word_rows)
    return fig


def _draw_top_words(fig, images: Images, maps: CodeMaps, colours: dict, patch_size: int, rows: int) -> None:
    """The `rows` most used words, each with up to PATCHES_PER_WORD patches that chose it, most confident first."""
    fig.suptitle("most used words and patches that chose them (most confident first)", fontsize=TITLE_SIZE)
    spare = max(fig.get_figure().get_figwidth() - LABEL_WIDTH - PATCHES_PER_WORD * PATCH_ROW, 0.0)
    axes = fig.subplots(rows, PATCHES_PER_WORD + 1, squeeze=False,
                        width_ratios=[1.0] * PATCHES_PER_WORD + [max(spare / PATCH_ROW, 0.01)])
    for ax in axes[:, -1]:
        ax.set_axis_off()
    for r, word in enumerate(maps.ranking[:rows]):
        where = np.argwhere(maps.words == word)  # [m, 3]: image, row, column
        where = where[np.argsort(-maps.confidence[tuple(where.T)], kind="stable")][:PATCHES_PER_WORD]
        for c, ax in enumerate(axes[r, :-1]):
            ax.set_axis_off()
            if c < len(where):
                i, y, x = where[c]
                crop = images.pixels[i, y * patch_size:(y + 1) * patch_size, x * patch_size:(x + 1) * patch_size]
                ax.imshow(crop.numpy(), interpolation="nearest")
                ax.set_axis_on()
                image_axis(ax)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colours.get(int(word), OTHER_WORDS))
                    spine.set_linewidth(3)
        axes[r, 0].set_axis_on()
        axes[r, 0].set_ylabel(f"word {word}\n{maps.uses[word]} patches", fontsize=7, rotation=0, ha="right",
                              va="center")
