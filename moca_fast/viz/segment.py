"""Segmentation predictions beside the ground truth, and the per-class IoU, from the examples file that
`python -m moca_fast.eval segment` writes beside its JSON (<output>_examples.npz, the first validation images).

One row per image: the image, its ground truth, the probe's prediction (ignored pixels dark grey), then a bar
chart of the per-class IoU over the whole validation set with the mIoU. Colours: one per class (tab20, then
repeated), the same in every panel; the legend lists the classes present in the shown images.

python -m moca_fast.viz segment eval_segment_examples.npz  (or the result JSON beside it)
"""
from __future__ import annotations

import sys
from pathlib import Path

from moca_fast.figures.segment import draw
from moca_fast.probes.segmentation_examples import examples_path, read_examples
from moca_fast.viz import cli


def figure(argv: list[str]):
    """(the figure, a summary line, the parsed flags) of the command line argv."""
    p = cli.parser("segment", __doc__, num_images=None, source=False)
    p.add_argument("examples", help="the examples file (<output>_examples.npz), or the result JSON beside it")
    args = p.parse_args(argv)
    path = Path(args.examples)
    if path.suffix == ".json":
        path = examples_path(path)
    meta, items = read_examples(path)
    return draw(meta, items), f"segmentation of {len(items)} validation images ({path})", args


def main(argv: list[str] | None = None) -> int:
    return cli.run(figure, argv)


if __name__ == "__main__":
    sys.exit(main())
