"""Full fine-tuning of the teacher (official eval_finetune.py, MAE recipe), built from timm's components.

Model: timm's VisionTransformer with the teacher's weights, global average pooling + fc_norm (the final
LayerNorm dropped, as MAE), drop path 0.2, a new head (trunc-normal std 2e-5). Optimiser: AdamW over timm's
layer-decay parameter groups (decay 0.65; no weight decay on 1-D tensors, pos_embed, cls_token; weight
decay 0.05), lr = 1e-3 x batch x world / 256, per iteration: 5 warm-up epochs then a half-cosine to 1e-6.
Data: timm's create_transform (RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25 pixel mode), timm's Mixup (mixup 0.8, cutmix 1.0, label smoothing 0.1) with
SoftTargetCrossEntropy (LabelSmoothingCrossEntropy when mixup and cutmix are off); validation on
resize + centre crop. bf16 autocast on a GPU, fp32 on the CPU. Reported top-1: the best epoch (as the
official script); the last epoch's beside it.
Checkpoints: after every epoch, into --save-dir (default: beside --output), atomically (a temporary folder
renamed, then `latest` replaced); `--resume auto` continues exactly (weights, optimiser, RNG states of every
rank; the data order is a function of the epoch). Files are loaded weights-only.
"""
from __future__ import annotations

import math
import os
import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from moca_fast.data import build_eval_loader
from moca_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moca_fast.errors import ConfigError
from moca_fast.eval import cli
from moca_fast.eval.data import train_loader

HEAD_INIT_STD = 2e-5
NEW_KEYS = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
LATEST = "latest"
#: settings a resumed run must share with the run it continues
RECIPE = ("epochs", "blr", "layer_decay", "weight_decay", "warmup_epochs", "min_lr", "drop_path", "mixup",
          "cutmix", "smoothing", "reprob", "aa", "seed")


def _timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ConfigError("fine-tuning builds on timm, which does not import here (pip install timm)") from None
    import timm.data
    import timm.loss
    import timm.optim

    _posterize_keeps_zero_bits()
    return timm


def _posterize_keeps_zero_bits() -> None:
    """timm's RandAugment asks for 0 kept bits at its strongest posterize level; Pillow >= 10 refuses 0
    (older Pillow returned the all-black image). Give timm's op table that older result."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        return Image.new(img.mode, img.size) if bits_to_keep <= 0 else original(img, bits_to_keep, **kwargs)

    for name, op in auto_augment.NAME_TO_OP.items():
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize


def build_classifier(teacher, num_classes: int, drop_path: float) -> nn.Module:
    """timm VisionTransformer (avg pool + fc_norm) holding the teacher's weights and a fresh head."""
    from timm.layers import trunc_normal_
    from timm.models.vision_transformer import VisionTransformer

    cfg = teacher.cfg
    model = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              num_classes=num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, global_pool="avg",
                              fc_norm=True, drop_path_rate=drop_path, norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
    state = {k: v for k, v in teacher.encoder.state_dict().items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != NEW_KEYS:
        raise ConfigError(f"{teacher.source}: does not fit timm's ViT (missing {sorted(set(missing) - NEW_KEYS)[:3]}, "
                          f"unexpected {unexpected[:3]})")
    trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(model.head.bias)
    return model


def lr_at(epoch: float, peak: float, args) -> float:
    """Linear warm-up to `peak` over warmup_epochs, then a half-cosine to min_lr at `epochs`."""
    if epoch < args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return args.min_lr + (peak - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(folder: Path, epoch: int, model, optimizer, history: list, recipe: dict, rank: int) -> None:
    """Collective. <folder>/epoch_NNNN/{model.pt, rng_rankR.pt} via a temporary folder, then `latest`."""
    name = f"epoch_{epoch:04d}"
    final, tmp = folder / name, folder / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "history": history, "recipe": recipe}, tmp / "model.pt")
    _barrier()
    if rank == 0:
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer = folder / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, folder / LATEST)
        for old in sorted(folder.glob("epoch_*")):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


def resume_folder(save_dir: Path, resume: str | None) -> Path | None:
    pointer = save_dir / LATEST
    if resume is None:
        if pointer.is_file():
            raise ConfigError(f"{save_dir} already holds a fine-tuning checkpoint; pass --resume auto to continue "
                              f"it or choose another --save-dir")
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "model.pt").is_file():
            raise ConfigError(f"--resume {resume}: no model.pt (a fine-tuning checkpoint folder is needed)")
        return path
    return save_dir / pointer.read_text().strip() if pointer.is_file() else None


def load(folder: Path, model, optimizer, recipe: dict, rank: int) -> tuple[int, list]:
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    for key, value in recipe.items():
        if state["recipe"].get(key) != value:
            raise ConfigError(f"--resume {folder}: was run with {key}={state['recipe'].get(key)!r}, "
                              f"this run has {value!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng = folder / f"rng_rank{rank}.pt"
    if not rng.is_file():
        raise ConfigError(f"--resume {folder}: no {rng.name} (written by fewer ranks than this run has)")
    _set_rng_state(torch.load(rng, weights_only=True))
    return state["epoch"], state["history"]


# ---------------------------------------------------------------------- train / evaluate
def _train_epoch(model, criterion, loader, optimizer, mixup, peak: float, args, epoch: int, device, show: bool):
    model.train()
    loader.sampler.set_epoch(epoch)
    total, steps = 0.0, 0
    for it, (images, labels) in enumerate(tqdm(loader, desc=f"fine-tune epoch {epoch + 1}/{args.epochs}",
                                               disable=not show, unit="batch", leave=False)):
        lr = lr_at(epoch + it / len(loader), peak, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixup is not None:
            images, labels = mixup(images, labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = criterion(model(images), labels)
        if not torch.isfinite(loss):
            raise ConfigError(f"fine-tuning loss is {loss.item()} at epoch {epoch + 1}, step {it}; lower --blr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def _validate(model, loader, device, world_size: int) -> tuple[float, float]:
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.tensor([hits[:, 0].sum(), hits.any(1).sum(), len(labels)], dtype=torch.float64,
                               device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    return 100.0 * float(counts[0] / counts[2]), 100.0 * float(counts[1] / counts[2])


def _parser():
    p = cli.parser("finetune", __doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-epochs", type=int, help="stop after this many epochs in this run (the schedule keeps --epochs)")
    p.add_argument("--blr", type=float, default=1e-3, help="base lr: lr = blr x batch x world / 256")
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--drop-path", type=float, default=0.2)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy")
    p.add_argument("--save-dir", help="checkpoint folder (default: <output without .json>_checkpoints)")
    p.add_argument("--resume", help="auto (the latest checkpoint of --save-dir) or a checkpoint folder")
    return p


def _evaluate(argv):
    args = _parser().parse_args(argv)
    cli.positive("--epochs", args.epochs)
    cli.positive("--max-epochs", args.max_epochs)
    if not 0 <= args.warmup_epochs < args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} must be in [0, --epochs {args.epochs})")
    timm = _timm()
    save_dir = Path(args.save_dir or f"{os.path.splitext(args.output)[0]}_checkpoints")
    s = cli.Session(args, default_batch=128, output_folders={"--save-dir": str(save_dir)})
    mixup_on = args.mixup > 0 or args.cutmix > 0
    if mixup_on and s.batch_size % 2:
        raise ConfigError(f"--batch-size {s.batch_size} must be even for mixup / cutmix (timm's Mixup)")
    torch.manual_seed(args.seed + s.rank)
    np.random.seed(args.seed + s.rank)
    random.seed(args.seed + s.rank)
    num_classes = len(s.splits.classes)
    torch.manual_seed(args.seed)  # the same initial head on every rank
    model = build_classifier(s.teacher, num_classes, args.drop_path).to(s.device)
    torch.manual_seed(args.seed + s.rank)
    groups = timm.optim.param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                                 layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    peak = args.blr * s.batch_size * s.world_size / 256
    mixup = timm.data.Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                            num_classes=num_classes) if mixup_on else None
    criterion = (timm.loss.SoftTargetCrossEntropy() if mixup_on else
                 timm.loss.LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())
    transform = timm.data.create_transform(input_size=s.cfg.img_size, is_training=True, color_jitter=None,
                                           auto_augment=args.aa, interpolation="bicubic", re_prob=args.reprob,
                                           re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loader = train_loader(s.splits.train, transform, s.batch_size, s.cfg.num_workers, args.seed, s.device)
    val_loader = build_eval_loader(s.splits.val, s.cfg, s.rank, s.world_size, s.device, s.batch_size)
    recipe = {k: getattr(args, k) for k in RECIPE} | {"batch_size": s.batch_size, "world_size": s.world_size,
                                                      "classes": num_classes}
    start, history = 0, []
    found = resume_folder(save_dir, args.resume)
    if found is not None:
        start, history = load(found, model, optimizer, recipe, s.rank)
    net = nn.parallel.DistributedDataParallel(model) if s.world_size > 1 else model
    stop = args.epochs if args.max_epochs is None else min(args.epochs, start + args.max_epochs)
    for epoch in range(start, stop):
        loss = _train_epoch(net, criterion, loader, optimizer, mixup, peak, args, epoch, s.device, s.is_main)
        top1, top5 = _validate(model, val_loader, s.device, s.world_size)
        history.append({"epoch": epoch + 1, "train_loss": loss, "top1": top1, "top5": top5})
        save(save_dir, epoch + 1, model, optimizer, history, recipe, s.rank)
    if not history:
        raise ConfigError(f"--resume: {found} already finished all {args.epochs} epochs")
    best = max(history, key=lambda h: h["top1"])
    done = history[-1]["epoch"]
    result = {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"],
              "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"], "epochs_done": done,
              "epochs": args.epochs, "lr": peak, "batch_size": s.batch_size * s.world_size,
              "recipe": recipe, "history": history, "train_images": len(s.splits.train),
              "val_images": len(s.splits.val), "checkpoints": str(save_dir), "checkpoint": s.teacher.source}
    summary = (f"fine-tuning: top-1 {best['top1']:.2f} % (top-5 {best['top5']:.2f} %) at epoch {best['epoch']}, "
               f"last {history[-1]['top1']:.2f} %; {done}/{args.epochs} epochs")
    return cli.output_of(args, s), result, summary


def main(argv: list[str] | None = None) -> int:
    return cli.run("finetune", _evaluate, argv)
