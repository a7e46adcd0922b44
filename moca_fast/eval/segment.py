"""Semantic segmentation probes of the teacher's patch tokens: linear (frozen teacher), fine-tuned, low-shot.

Data: --data DIR in its own layout (Cityscapes, ADE20K, VOC 2012, or a folder of image / mask pairs with a
classes.txt: moca_fast.data.segmentation; --layout picks one, else it is recognised), or `--data demo` (digit
mosaics, moca_fast.data.segmentation_demo). Train on the `train` split, score on `val`.
Linear (default; Segmenter's linear decoder): the frozen teacher (no_grad, bf16 on a GPU), the last layer's
LayerNorm'ed patch tokens (--features last4: the last four layers, BatchNorm, as DINOv2's linear head), a 1x1
conv, logits upsampled bilinearly, cross-entropy ignoring 255. Training crops: the encoder's input size, random
rescale 0.5-2.0, crop, flip; SGD momentum 0.9, lr 0.01 poly 0.9, batch 8, 80k iterations (Segmenter's
Cityscapes schedule). Scoring: sliding windows of the input size, stride 2/3 of it (Segmenter's 768 / 512),
logits upsampled to the label's resolution; mIoU over the classes, per-class IoU, pixel accuracy.
--finetune trains the encoder too, with timm's layer-wise lr decay (--layer-decay 0.65). --cached trains the
linear head on patch features computed once, of non-overlapping windows at the base scale (no augmentation: a
quick check). --shots N ... --splits S: low-shot, split s keeps the first N images of a permutation of the
training images by numpy's default_rng(seed + s); mean and std (population) of the mIoU over the splits.
--random-init (default with --data demo) scores the same architecture at random initialisation beside it.
On a CPU, torch gets the cores left after the loader's workers (moca_fast.cpu_threads, as the trainer; cli.Session).
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from moca_fast.errors import ConfigError
from moca_fast.data.segmentation import SHOWN_NAMES, load_segmentation
from moca_fast.data.segmentation_demo import prepare_segmentation_demo
from moca_fast.data.segmentation_loader import SCALE, EndlessBatches, TrainCrops, WholeImages, one_image
from moca_fast.eval import cli
from moca_fast.io.teacher import random_teacher
from moca_fast.probes.segmentation_cache import cached_batches, window_features
from moca_fast.probes.segmentation_examples import write_examples
from moca_fast.probes.segmentation_head import FEATURES, SegmentationProbe
from moca_fast.probes.segmentation_metrics import segmentation_scores
from moca_fast.probes.segmentation_train import Problems, score_probe, train_probe

log = logging.getLogger("moca_fast.eval")

RECIPE = {"iters": 80000, "batch_size": 8, "lr": 0.01, "scale": SCALE, "features": "last"}
#: the demo's, chosen on its own validation set from lr 0.05 / 0.5, scale 0.5-2 / 1, features last / last4
DEMO_RECIPE = {"iters": 500, "batch_size": 32, "lr": 0.05, "scale": (1.0, 1.0), "features": "last4"}
BASE_SIZE = {"ade20k": 512, "voc": 512}  # short side (mmsegmentation's 2048 x 512); others: the file's size
LAYOUT_CHOICES = ("auto", "cityscapes", "ade20k", "voc", "folder")


def _parser():
    p = cli.parser("segment", __doc__.split("\n\n")[0],
                   data_help="segmentation set (Cityscapes, ADE20K, VOC 2012, folder layout) or 'demo'")
    p.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto")
    p.add_argument("--features", choices=FEATURES, help="default last; demo last4")
    p.add_argument("--iters", type=int, help=f"training iterations (default {RECIPE['iters']}; demo "
                                             f"{DEMO_RECIPE['iters']})")
    p.add_argument("--lr", type=float, help=f"base lr (default {RECIPE['lr']}; demo {DEMO_RECIPE['lr']})")
    p.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random rescaling of training images (default 0.5 2.0; demo 1 1: its digits have one size)")
    p.add_argument("--stride", type=int, help="sliding-window stride in pixels (default 2/3 of the window)")
    p.add_argument("--base-size", type=int, help="short side images are scaled to (default: ADE20K, VOC 512; "
                                                 "others as stored)")
    p.add_argument("--cached", action="store_true", help="train the head on features computed once (no augmentation)")
    p.add_argument("--finetune", action="store_true", help="train the encoder too (layer-wise lr decay)")
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--shots", type=int, nargs="+", default=[], help="low-shot: N training images (e.g. 10 50)")
    p.add_argument("--splits", type=int, default=3, help="low-shot draws per N")
    p.add_argument("--val-images", type=int, help="score only the first N validation images (quick)")
    p.add_argument("--examples", type=int, default=4, help="validation predictions kept for "
                                                           "`python -m moca_fast.viz segment` (0: none)")
    p.add_argument("--random-init", action="store_true", help="also score the architecture at random init "
                                                               "(default with --data demo)")
    return p


def _check(args) -> None:
    for flag in ("iters", "stride", "base_size", "splits", "val_images"):
        cli.positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    cli.positive("--examples", args.examples, 0)
    for n in args.shots:
        cli.positive("--shots", n)
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr {args.lr} must be > 0")
    if not 0 < args.layer_decay <= 1:
        raise ConfigError(f"--layer-decay {args.layer_decay} must be in (0, 1]")
    if args.scale is not None and not 0 < args.scale[0] <= args.scale[1]:
        raise ConfigError(f"--scale {args.scale[0]:g} {args.scale[1]:g}: need 0 < MIN <= MAX")
    if args.cached and args.finetune:
        raise ConfigError("--cached trains a head on fixed features; it cannot be combined with --finetune")
    if args.data is None:
        raise ConfigError("give --data DIR (Cityscapes, ADE20K, VOC 2012 or folder layout) or --data demo")


def low_shot_subsets(n_images: int, shots: list[int], splits: int, seed: int) -> dict[int, list[list[int]]]:
    """{N: [sorted image indices of split s]}: split s keeps the first N of numpy default_rng(seed + s)'s
    permutation of the n_images (so a split's N-image subset holds its smaller ones)."""
    too_many = [n for n in shots if n > n_images]
    if too_many:
        raise ConfigError(f"--shots {too_many[0]}: the training split has only {n_images} images")
    orders = [np.random.default_rng(seed + s).permutation(n_images).tolist() for s in range(splits)]
    return {n: [sorted(order[:n]) for order in orders] for n in shots}


def _log_problems(problems: Problems, data, what: str) -> dict:
    if not problems.found:
        return {"count": 0, "first": []}
    first = sorted(problems.found)[:SHOWN_NAMES]
    names = [f"{data.masks[i]} ({problems.found[i]})" for i in first]
    log.warning("%s: %d masks partly or wholly ignored: %s", what, len(problems.found), "; ".join(names))
    return {"count": len(problems.found), "first": names}


class _Runner:
    """Trains and scores one probe per (teacher, training subset)."""

    def __init__(self, args, s: cli.Session, train, val):
        self.args, self.s, self.train, self.val = args, s, train, val
        demo = args.data == "demo"
        recipe = DEMO_RECIPE if demo else RECIPE
        self.iters = args.iters or recipe["iters"]
        self.lr = args.lr or recipe["lr"]
        self.scale = tuple(args.scale or recipe["scale"])
        self.features = args.features or recipe["features"]
        self.batch = s.batch_size
        self.window = s.cfg.img_size
        self.stride = args.stride or max(1, self.window * 2 // 3)
        self.base = args.base_size or BASE_SIZE.get(train.layout)
        keep = range(min(len(val), args.val_images or len(val)))
        mine = list(keep)[s.rank::s.world_size]
        self.val_loader = DataLoader(Subset(WholeImages(val, self.base), mine), batch_size=1, collate_fn=one_image,
                                     num_workers=s.cfg.num_workers)
        self.val_count = len(keep)
        self.timing = {"train_images": 0, "train_s": 0.0, "val_images": 0, "val_s": 0.0}
        self.train_problems = Problems()

    def batches(self, probe, indices: list[int]):
        if self.args.cached:
            feats, labels = window_features(probe.features, self.train, indices, self.window, self.base,
                                            self.s.device, self.train_problems)
            return cached_batches(feats, labels, self.batch, self.args.seed, self.s.rank, self.s.world_size)
        crops = TrainCrops(self.train, self.window, self.base, self.args.seed, self.scale)
        sampler = EndlessBatches(indices, self.batch, self.args.seed, self.s.rank, self.s.world_size)
        loader = DataLoader(crops, batch_sampler=sampler, num_workers=self.s.cfg.num_workers,
                            pin_memory=self.s.device.type == "cuda")
        return self._recorded(loader)

    def _recorded(self, loader):
        for x, y, index, problem in loader:
            for i, why in zip(index.tolist(), problem):
                self.train_problems.add(i, why)
            yield x, y

    def run(self, encoder, indices: list[int], what: str, keep_examples: int):
        """(scores, problems, examples) of a probe trained on the training images `indices`."""
        torch.manual_seed(self.args.seed)  # the same initial head on every rank
        if self.args.finetune:
            encoder = copy.deepcopy(encoder).requires_grad_(True)
        probe = SegmentationProbe(encoder, self.train.num_classes, self.features,
                                  frozen=not self.args.finetune).to(self.s.device)
        start = time.perf_counter()
        batches = self.batches(probe, indices)
        losses = train_probe(probe, iter(batches), self.iters, self.batch, self.lr,
                             self.args.layer_decay if self.args.finetune else None, self.s.device,
                             from_features=self.args.cached, desc=f"{what} training")
        self.timing["train_s"] += time.perf_counter() - start
        self.timing["train_images"] += self.iters * self.batch * self.s.world_size
        start = time.perf_counter()
        conf, problems, examples = score_probe(probe, self.val_loader, self.window, self.stride,
                                               self.train.num_classes, self.s.device, keep_examples,
                                               desc=f"{what} scoring")
        self.timing["val_s"] += time.perf_counter() - start
        self.timing["val_images"] += self.val_count
        scores = segmentation_scores(conf, self.train.classes)
        scores["final_loss"] = float(np.mean(losses[-max(1, len(losses) // 10):]))
        log.info("%s: mIoU %.2f %%, pixel accuracy %.2f %%", what, scores["miou"] or float("nan"),
                 scores["pixel_accuracy"] or float("nan"))
        return scores, problems, examples


def _evaluate(argv):
    args = _parser().parse_args(argv)
    _check(args)
    recipe = DEMO_RECIPE if args.data == "demo" else RECIPE
    s = cli.Session(args, default_batch=recipe["batch_size"], class_folders=False)
    root = prepare_segmentation_demo() if args.data == "demo" else args.data
    train, val = load_segmentation(root, "train", args.layout), load_segmentation(root, "val", args.layout)
    runner = _Runner(args, s, train, val)
    subsets = ({f"{n}-shot": splits for n, splits in
                low_shot_subsets(len(train), args.shots, args.splits, args.seed).items()}
               if args.shots else {"full": [list(range(len(train)))]})
    teachers = [("teacher", s.teacher)]
    if args.random_init or args.data == "demo":
        teachers.append(("random_init", random_teacher(s.teacher.cfg, "its architecture", s.device)))
    results, problems, examples = {}, Problems(), []
    for name, teacher in teachers:
        runs = {}
        for subset_name, splits in subsets.items():
            scores = []
            for k, indices in enumerate(splits):
                keep = args.examples if s.is_main and not examples and name == "teacher" else 0
                score, found, kept = runner.run(teacher.encoder, indices, f"{name} {subset_name} {k + 1}/"
                                                f"{len(splits)}", keep)
                scores.append(score | {"train_images": len(indices)})
                problems.found.update(found.found)
                examples += kept
            mious = np.array([sc["miou"] or 0.0 for sc in scores])
            runs[subset_name] = {"miou_mean": float(mious.mean()), "miou_std": float(mious.std()), "runs": scores}
        results[name] = runs
    main_run = results["teacher"][next(iter(subsets))]
    best = main_run["runs"][0]
    timing = runner.timing
    result = {
        "miou": main_run["miou_mean"], "miou_std": main_run["miou_std"],
        "pixel_accuracy": best["pixel_accuracy"], "iou": best["iou"], "results": results,
        "settings": {"layout": train.layout, "data": root, "classes": train.classes, "features": runner.features,
                     "head": "batchnorm + 1x1 conv" if runner.features == "last4" else "1x1 conv",
                     "protocol": "finetune" if args.finetune else "linear", "cached": args.cached,
                     "iters": runner.iters, "batch_size": runner.batch * s.world_size, "lr": runner.lr,
                     "scale": None if args.cached else runner.scale,
                     "layer_decay": args.layer_decay if args.finetune else None, "window": runner.window,
                     "stride": runner.stride, "base_size": runner.base, "seed": args.seed,
                     "shots": args.shots, "splits": args.splits if args.shots else 1,
                     "cpu_threads": s.threads.threads if s.threads else None},
        "train_images": len(train), "val_images": runner.val_count,
        "skipped_pairs": {f"{split.split}: {why}": len(names) for split in (train, val)
                          for why, names in split.skipped.items()},
        "ignored_masks": {"val": _log_problems(problems, val, "validation"),
                          "train": _log_problems(runner.train_problems, train, "training")},
        "images_per_s": {"train": timing["train_images"] / max(timing["train_s"], 1e-9),
                         "val": timing["val_images"] / max(timing["val_s"], 1e-9)},
        "checkpoint": s.teacher.source}
    if s.is_main and examples:
        result["examples"] = str(write_examples(args.output, val, examples, result, runner.base))
    summary = f"segmentation ({result['settings']['protocol']}, {runner.features}): " + " | ".join(
        f"{name} " + ", ".join(f"{sub} mIoU {r['miou_mean']:.2f}" + (f" ± {r['miou_std']:.2f}" if args.shots else "")
                               for sub, r in runs.items()) for name, runs in results.items())
    summary += f" % on {runner.val_count} val images"
    return cli.output_of(args, s), result, summary


def main(argv: list[str] | None = None) -> int:
    return cli.run("segment", _evaluate, argv)
