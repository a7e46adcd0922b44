"""Low-shot classification by logistic regression on frozen teacher features (official
eval_lowshot_logistic.py, scikit-learn path, as in README_LOWSHOT.md).

Features: the teacher's patch tokens averaged *before* the final LayerNorm, then per image centred (its own
mean over channels subtracted) and L2-normalised. Classifier: scikit-learn's multinomial
LogisticRegression, L2 penalty, C = 1 / λ (λ = 0.1), no intercept, lbfgs, tol 1e-4, at most 300
iterations; score = top-1 on the whole val/ folder.
Training subsets: --subset FILE (repeatable; one image per line, a path relative to the train folder, or
the official bare ImageNet name `n01440764_10026.JPEG`, whose class is the part before `_`), and/or
--shots N ... --splits S: split s draws, per class, a seeded random order (seed + s) and keeps its first
N images (so the 1-shot image is among the 2-shot ones). Each shot count reports mean ± std over its
splits (numpy's population std, as README_LOWSHOT.md). Features are extracted once, for the union of the
images of all subsets.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moca_fast.errors import ConfigError
from moca_fast.eval import cli
from moca_fast.io.teacher import TeacherTokens
from moca_fast.probes.features import extract, subset

log = logging.getLogger("moca_fast.eval")

LAMBDA = 0.1
MAX_ITER = 300
TOL = 1e-4


def lowshot_features(pre: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """[B, 1 + L, C] pre-norm tokens -> [B, C]: patch average, centred per image, L2-normalised."""
    avg = pre[:, 1:].mean(dim=1)
    return F.normalize(avg - avg.mean(dim=1, keepdim=True), dim=1)


def read_subset(path: str, train) -> list[int]:
    """Indices into the train ImageList of the images a subset file names (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--subset {path}: no such file")
    position = {os.path.relpath(f, train.root): i for i, f in enumerate(train.files)}
    lines = [ln.strip() for ln in file.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"--subset {path} names no image")
    wanted = [ln if "/" in ln else f"{ln.split('_')[0]}/{ln}" for ln in lines]
    missing = [ln for ln, rel in zip(lines, wanted) if os.path.normpath(rel) not in position]
    if missing:
        raise ConfigError(f"--subset {path}: {missing[0]} is not an image of {train.root} "
                          f"({len(missing)} of {len(lines)} listed images are missing)")
    indices = [position[os.path.normpath(rel)] for rel in wanted]
    classes = sorted({train.labels[i] for i in indices})
    if len(classes) < 2:
        raise ConfigError(f"--subset {path}: all {len(indices)} images are of class {train.classes[classes[0]]!r}; "
                          f"logistic regression needs at least 2 classes")
    return indices


def draw_subsets(labels: list[int], classes: list[str], shots: list[int], splits: int, seed: int
                 ) -> dict[int, list[list[int]]]:
    """{N: [indices of split s for s in range(splits)]}: per class, the first N of a seeded random order."""
    by_class = [[] for _ in classes]
    for i, label in enumerate(labels):
        by_class[label].append(i)
    for n in shots:
        short = [c for c, members in zip(classes, by_class) if len(members) < n]
        if short:
            raise ConfigError(f"--shots {n}: class {short[0]!r} has only {len(by_class[classes.index(short[0])])} "
                              f"training images ({len(short)} classes have fewer than {n})")
    out = {n: [] for n in shots}
    for s in range(splits):
        rng = np.random.default_rng(seed + s)
        orders = [[members[j] for j in rng.permutation(len(members))] for members in by_class]
        for n in shots:
            out[n].append(sorted(i for order in orders for i in order[:n]))
    return out


def fit_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              lambd: float) -> tuple[float, float]:
    """(train top-1, test top-1) in percent of the official classifier."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=1.0 / lambd, fit_intercept=False, solver="lbfgs", tol=TOL, max_iter=MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # as the official script: 300 iterations, then stop
        classifier.fit(train_x, train_y)
    return 100.0 * classifier.score(train_x, train_y), 100.0 * classifier.score(test_x, test_y)


def _import_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError("low-shot evaluation needs scikit-learn (pip install scikit-learn)") from None


def _evaluate(argv):
    p = cli.parser("lowshot", __doc__.split("\n\n")[0])
    p.add_argument("--subset", action="append", default=[], metavar="FILE", help="a subset file (repeatable)")
    p.add_argument("--shots", type=int, nargs="+", default=[], help="draw N-shot subsets (e.g. 1 2 5)")
    p.add_argument("--splits", type=int, default=3, help="drawn subsets per shot count")
    p.add_argument("--lambd", type=float, nargs="+", default=[LAMBDA], help="L2 regularisation (C = 1 / λ)")
    args = p.parse_args(argv)
    if not args.subset and not args.shots:
        args.shots = [1, 2, 5]
    for n in args.shots:
        cli.positive("--shots", n)
    cli.positive("--splits", args.splits)
    for lambd in args.lambd:
        if not lambd > 0:
            raise ConfigError(f"--lambd {lambd} must be > 0")
    _import_sklearn()
    s = cli.Session(args, default_batch=128)
    train = s.splits.train
    groups = {f"{n}-shot": splits for n, splits in
              draw_subsets(train.labels, train.classes, args.shots, args.splits, args.seed).items()}
    for path in args.subset:
        groups.setdefault(Path(path).stem, []).append(read_subset(path, train))
    needed = sorted({i for splits in groups.values() for split in splits for i in split})
    tokens, kind = TeacherTokens(s.teacher.encoder), {"f": lowshot_features}
    feats, labels = extract(tokens, subset(train, needed), s.cfg, s.device, s.batch_size,
                            "low-shot train features", kind)
    val, val_labels = extract(tokens, s.splits.val, s.cfg, s.device, s.batch_size, "low-shot val features", kind)
    if not s.is_main:
        return None, {}, ""
    row = {i: r for r, i in enumerate(needed)}
    x, y = feats["f"].cpu().numpy(), labels.cpu().numpy()
    test_x, test_y = val["f"].cpu().numpy(), val_labels.cpu().numpy()
    results = []
    for name, splits in groups.items():
        for lambd in args.lambd:
            scores = []
            for split in splits:
                rows = [row[i] for i in split]
                train_top1, top1 = fit_score(x[rows], y[rows], test_x, test_y, lambd)
                scores.append({"images": len(rows), "train_top1": train_top1, "top1": top1})
            tops = np.array([sc["top1"] for sc in scores])
            results.append({"name": name, "lambd": lambd, "mean": float(tops.mean()), "std": float(tops.std()),
                            "splits": scores})
            log.info("low-shot %s, λ=%g: %.2f ± %.2f %%", name, lambd, tops.mean(), tops.std())
    first = [r for r in results if r["name"] == results[0]["name"]]
    best = max(first, key=lambda r: r["mean"])
    result = {"top1": best["mean"], "lambd": best["lambd"], "results": results, "val_images": len(test_y),
              "train_images_used": len(needed), "checkpoint": s.teacher.source}
    summary = "low-shot logistic regression: " + " | ".join(
        f"{r['name']} {r['mean']:.2f} ± {r['std']:.2f} %" for r in results if r["lambd"] == best["lambd"]
    ) + f" (λ={best['lambd']:g}, top-1 on {len(test_y)} val images)"
    return cli.output_of(args, s), result, summary


def main(argv: list[str] | None = None) -> int:
    return cli.run("lowshot", _evaluate, argv)
