"""Nearest training images of a few query images by the teacher's features.

Features as the k-NN evaluation takes them: the teacher's final patch tokens averaged ([AVG]), L2-normalised;
neighbours by cosine similarity. The training images: --train DIR, else the training folder of --data (the
demo's for --data demo, DIR/train for a folder with one), else the source's own training data (the demo set for
a demo run). Above --max-train images, an evenly spaced subset of them is searched (the title says so). A query
that is itself a training image is not its own neighbour. Neighbour titles: cosine similarity and class, green
when the class is the query's, red when not.

python -m moca_fast.viz neighbors --checkpoint RUN [QUERIES ...] [--data demo] [--train DIR] [-k 8]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import Patch

from moca_fast.config import Config
from moca_fast.data.scan import ImageList, scan_images
from moca_fast.errors import ConfigError
from moca_fast.figures.figure import image_axis, new_figure, set_title, short_name
from moca_fast.figures.images import Images, load_images
from moca_fast.io.teacher import TeacherTokens
from moca_fast.probes.features import extract, subset
from moca_fast.viz import cli

PANEL = 1.4
HEADER = 0.7
LEGEND_HEIGHT = 0.4
SAME, OTHER = "tab:green", "tab:red"


def training_folder(train: str | None, data: str | None, cfg: Config) -> str:
    if train is not None:
        return train
    if data == "demo" or (data is None and cfg.data is None):
        from moca_fast.data.demo import prepare_demo

        return prepare_demo().train
    if data is not None:
        inside = os.path.join(data, "train")
        return inside if os.path.isdir(inside) else data
    return str(cfg.data)


def bank_subset(images: ImageList, most: int) -> ImageList:
    """At most `most` images, evenly spaced over the list (every class keeps its share)."""
    if len(images) <= most:
        return images
    return subset(images, np.linspace(0, len(images) - 1, most).round().astype(int).tolist())


def avg_features(pre: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """The k-NN's feature: final patch tokens averaged, L2-normalised ([B, 1 + L, C] -> [B, C])."""
    return F.normalize(normed[:, 1:].mean(dim=1), dim=1)


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int, query_files: list[str],
            bank_files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [N, k], bank indices [N, k]) of each query's k most similar bank images, itself excluded."""
    sims = queries @ bank.T
    position = {f: i for i, f in enumerate(bank_files)}
    own = [(q, position[f]) for q, f in enumerate(query_files) if f in position]
    for q, i in own:
        sims[q, i] = float("-inf")
    k = min(k, bank.shape[0] - (1 if own else 0))
    if k < 1:
        raise ConfigError("no training image to search besides the queries themselves")
    return sims.topk(k, dim=1)


def draw(queries: Images, neighbours: list[Images], sims: torch.Tensor, title: str):
    n, k = len(queries), sims.shape[1]
    fig = new_figure((k + 1) * PANEL, n * PANEL + HEADER + LEGEND_HEIGHT)
    set_title(fig, title)
    axes = fig.subplots(n, k + 1, squeeze=False)
    for q in range(n):
        axes[q, 0].imshow(queries.pixels[q].numpy(), interpolation="nearest")
        cls = queries.classes[q]
        image_axis(axes[q, 0], f"query {short_name(queries.files[q], 14)}" + (f"\nclass {cls}" if cls else ""))
        for spine in axes[q, 0].spines.values():
            spine.set_linewidth(3)
        for j in range(k):
            ax = axes[q, j + 1]
            ax.imshow(neighbours[q].pixels[j].numpy(), interpolation="nearest")
            other = neighbours[q].classes[j]
            image_axis(ax, f"{float(sims[q, j]):.3f}" + (f"\nclass {other}" if other else ""))
            if cls and other:
                ax.title.set_color(SAME if other == cls else OTHER)
    fig.legend(handles=[Patch(color=SAME, label="same class as the query"),
                        Patch(color=OTHER, label="another class")],
               loc="outside lower center", ncols=2, fontsize=8, title="neighbour title: cosine similarity, class",
               title_fontsize=8)
    return fig


def figure(argv: list[str]):
    """(the figure, a summary line, the parsed flags) of the command line argv."""
    p = cli.parser("neighbors", __doc__, num_images=4)
    p.add_argument("--train", help="the training images to search (class sub-folders or flat)")
    p.add_argument("-k", type=int, default=8, help="neighbours per query (default 8)")
    p.add_argument("--max-train", type=int, default=20000,
                   help="search at most this many training images, evenly spaced (default 20000)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading workers for the training images")
    args = p.parse_args(argv)
    cli.positive("-k", args.k)
    cli.positive("--max-train", args.max_train)
    inputs = cli.load_inputs(args)
    cfg = inputs.teacher.cfg
    if args.num_workers is not None:
        cfg = cfg.replace(num_workers=cli.positive("--num-workers", args.num_workers, 0))
    if cfg.num_workers > 0:
        # workers pass batches through shared-memory files, not through file descriptors handed over a socket:
        # a signal in the middle of such a hand-over leaves the worker printing a traceback after this command's
        # one line (multiprocessing's resource_sharer)
        torch.multiprocessing.set_sharing_strategy("file_system")
    everything = scan_images(training_folder(args.train, args.data, cfg))
    bank_images = bank_subset(everything, args.max_train)
    dev = inputs.tokens.device
    bank, _ = extract(TeacherTokens(inputs.teacher.encoder), bank_images, cfg, dev, args.batch_size,
                      "training features", {"avg": avg_features})
    queries = F.normalize(inputs.tokens.mean(dim=1), dim=1)
    sims, found = nearest(queries, bank["avg"], args.k, inputs.images.files, bank_images.files)
    named = len(bank_images.classes) > 1
    neighbours = [load_images([(bank_images.files[i], bank_images.classes[bank_images.labels[i]] if named else "")
                               for i in row.tolist()], cfg.img_size) for row in found]
    searched = (f"{len(bank_images)} training images" if len(bank_images) == len(everything)
                else f"{len(bank_images)} of {len(everything)} training images (evenly spaced)")
    title = (f"Nearest training images by the teacher's features: {inputs.title}\n"
             f"[AVG] of the final patch tokens, cosine similarity, among {searched} in {bank_images.root}")
    summary = f"{sims.shape[1]} nearest of {len(inputs.images)} queries among {searched}"
    return draw(inputs.images, neighbours, sims, title), summary, args


def main(argv: list[str] | None = None) -> int:
    return cli.run(figure, argv)


if __name__ == "__main__":
    sys.exit(main())
