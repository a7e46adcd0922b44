"""k-NN evaluation of the teacher's [AVG] features, DINO protocol (the classifier: moca_fast.probes.knn).

Standalone (the official sweep, k in {10, 20} x 10 temperatures):
python -m moca_fast.eval knn --checkpoint RUN_OR_CHECKPOINT --data DIR   (also python -m moca_fast.eval.knn)
(DIR holds train/ and val/ class folders; or --train DIR --val DIR).
"""
from __future__ import annotations

import sys

import torch.distributed as dist
import torch.nn.functional as F

from moca_fast.errors import ConfigError
from moca_fast.eval import cli
from moca_fast.io.teacher import TeacherTokens
from moca_fast.probes.features import extract
from moca_fast.probes.knn import SWEEP_K, SWEEP_TEMPERATURES, knn_sweep_correct


def _evaluate(argv, prog):
    p = cli.parser("knn", "k-NN sweep on the teacher's L2-normalised [AVG] features (DINO voting, official grid).",
                   prog)
    p.add_argument("--k", type=int, nargs="+", default=list(SWEEP_K), help="neighbour counts to sweep")
    p.add_argument("--temperature", type=float, nargs="+", default=list(SWEEP_TEMPERATURES),
                   help="vote temperatures to sweep")
    args = p.parse_args(argv)
    for k in args.k:
        cli.positive("--k", k)
    for t in args.temperature:
        if not t > 0:
            raise ConfigError(f"--temperature {t} must be > 0")
    s = cli.Session(args, default_batch=256)
    tokens = TeacherTokens(s.teacher.encoder)
    avg = {"avg": lambda pre, normed: F.normalize(normed[:, 1:].mean(dim=1), dim=1)}
    bank, bank_labels = extract(tokens, s.splits.train, s.cfg, s.device, s.batch_size, "k-NN train features", avg)
    queries, query_labels = extract(tokens, s.splits.val, s.cfg, s.device, s.batch_size, "k-NN val features", avg)
    mine = slice(s.rank, None, s.world_size)  # each rank votes for its share of the queries
    counts = knn_sweep_correct(bank["avg"], bank_labels, queries["avg"][mine], query_labels[mine], args.k,
                               args.temperature, len(s.splits.classes)).to(bank_labels.device)
    if s.world_size > 1:
        dist.all_reduce(counts)
    total = len(s.splits.val)
    cells = [{"k": k, "temperature": t, "top1": 100.0 * float(counts[i, j, 0]) / total,
              "top5": 100.0 * float(counts[i, j, 1]) / total}
             for i, k in enumerate(args.k) for j, t in enumerate(args.temperature)]
    best = max(cells, key=lambda c: c["top1"])  # the first of equal cells
    result = {"top1": best["top1"], "top5": best["top5"], "k": best["k"], "temperature": best["temperature"],
              "cells": cells, "train_images": len(s.splits.train), "val_images": total,
              "checkpoint": s.teacher.source}
    summary = (f"k-NN: top-1 {best['top1']:.2f} % (top-5 {best['top5']:.2f} %) at k={best['k']}, "
               f"T={best['temperature']:g}, best of {len(cells)} settings; {total} val images")
    return cli.output_of(args, s), result, summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return cli.run("knn", lambda a: _evaluate(a, prog), argv)


if __name__ == "__main__":
    sys.exit(main(prog="python -m moca_fast.eval.knn"))
