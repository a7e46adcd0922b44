"""What the figure commands share: their flags, the source and images they read, and how they end.

Source: --checkpoint / --preset, exactly as the evaluation commands take them (moca_fast.io.teacher).
Images: files or folders as arguments, or --data demo (moca_fast.figures.images). --output FILE.png (default
viz_<kind>.png in the current folder; checked before any work). A command prints one line naming the PNG it
wrote. Bad input: one line `error: ...` naming the file or setting, exit status 2; any other error: one line
`error: rank 0: Type: message (traceback in FILE)`, exit status 1 (moca_fast.entry). SIGINT / SIGTERM / SIGHUP:
one line, exit status 128 + the signal's number, and no figure file (moca_fast.ending; PNGs are written to a
temporary name and renamed into place).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from moca_fast.entry import OneLineParser, known_error, positive, run_main
from moca_fast.figures.figure import save_png, where
from moca_fast.figures.images import Images, encoder_tokens, find_images, load_images, patch_tokens
from moca_fast.io.teacher import Teacher, load_teacher
from moca_fast.output_files import check_output_file


class FigureParser(OneLineParser):
    """Checks --output as soon as the flags are parsed: an unwritable path is refused before any work."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        check_output_file(parsed.output, "--output")
        return parsed


def parser(kind: str, doc: str, num_images: int | None = 8, source: bool = True) -> FigureParser:
    """The command's parser: source flags (unless source=False), image arguments (unless num_images is None),
    --output."""
    p = FigureParser(prog=f"python -m moca_fast.viz {kind}", description=doc,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if source:
        p.add_argument("--checkpoint", help="run folder, checkpoint folder, model file, official checkpoint "
                                            "(with --preset) or timm export; absent: --preset at random init")
        p.add_argument("--preset", help="architecture of an official checkpoint, or the randomly initialised preset")
    if num_images is not None:
        p.add_argument("images", nargs="*", help="image files (each used) or folders (up to --num-images each)")
        p.add_argument("--data", help="'demo' (the demo's held-out digits) or a folder (its val/ when present)")
        p.add_argument("--num-images", type=int, default=num_images,
                       help=f"images taken from each folder, one class after another (default {num_images})")
        p.add_argument("--batch-size", type=int, default=64, help="images per teacher forward (default 64)")
    p.add_argument("--output", default=f"viz_{kind}.png", help=f"the PNG file to write (default viz_{kind}.png)")
    return p


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Inputs:
    """The source's teacher, the images and their teacher patch tokens [N, L, C] (fp32)."""

    teacher: Teacher
    images: Images
    tokens: torch.Tensor

    @property
    def title(self) -> str:
        return where(self.teacher.source, self.teacher.step)


def load_inputs(args: argparse.Namespace) -> Inputs:
    """The teacher of --checkpoint / --preset and one batched forward of the images through it."""
    positive("--num-images", args.num_images)
    positive("--batch-size", args.batch_size)
    found = find_images(args.images, args.data, args.num_images)  # input errors before the model loads
    dev = device()
    teacher = load_teacher(args.checkpoint, args.preset, dev)
    images = load_images(found, teacher.cfg.img_size)
    tokens = patch_tokens(encoder_tokens(teacher.encoder), images.normalized(dev), args.batch_size)
    return Inputs(teacher, images, tokens)


def run(figure, argv: list[str] | None) -> int:
    """figure(argv) -> (matplotlib Figure, summary, parsed args): writes args.output and prints
    "summary -> path"; stops and errors end as one line (moca_fast.entry)."""
    return run_main(lambda end: _run(figure, argv, end), known=known_error)


def _run(figure, argv: list[str] | None, end) -> int:
    end.immediate("before the figure was written: nothing written")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    fig, summary, args = figure(argv)
    path = save_png(fig, args.output)
    print(f"{summary}  ->  {path}")
    return 0
