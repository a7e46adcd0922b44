"""Training curves of one or more runs, overlaid and labelled by run.

From each run folder's metrics.jsonl (launch/train.py writes it): the loss, the image (cross-view) loss, the
dense (same-view) loss and the learning rate per logged step; the teacher's k-NN top-1 at each evaluation, with
the random initialisation (knn_random_init.json, at step 0) and the final one (eval.json) when present.
A line of metrics.jsonl that is not a JSON record (a line cut short by a crash) is skipped and counted.

python -m moca_fast.viz curves RUN [RUN ...] [--output curves.png]
"""
from __future__ import annotations

import sys

from moca_fast.figures.curves import curves_figure, METRICS
from moca_fast.viz import cli


def figure(argv: list[str]):
    """(the figure, a summary line, the parsed flags) of the command line argv."""
    p = cli.parser("curves", __doc__, num_images=None, source=False)
    p.add_argument("runs", nargs="+", metavar="RUN", help=f"run folders (or their {METRICS})")
    args = p.parse_args(argv)
    return curves_figure(args.runs), f"training curves of {len(args.runs)} run(s)", args


def main(argv: list[str] | None = None) -> int:
    return cli.run(figure, argv)


if __name__ == "__main__":
    sys.exit(main())
