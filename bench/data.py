"""Loader-only throughput: image pairs per second out of each data backend, no model.

    python bench/data.py                      # 512 generated 500x375 JPEGs, 224 px views
    python bench/data.py --data /imagenet/train --batch 256 --steps 50
    python bench/data.py --small              # CI smoke run: tiny images, a few batches, seconds

Rows (each reports ok / missing / failed: why): synthetic (random tensors on the device), torch
(DataLoader + PIL) with each --workers count, DALI on the CPU (device_id=None, threads = workers),
and with a GPU: DALI's nvJPEG pipeline and torchvision's nvJPEG batch decode (decode only, no
augmentation: the GPU decode ceiling where DALI cannot be installed). pairs/s is one image's two
views per pair, the unit of the trainer's img/s; a loader keeps up when its pairs/s is at least
twice the training step rate on the same machine. startup_s is the time to the first batch
(workers, pipeline build). pairs/cpu-s divides the timed pairs by the CPU seconds that this process
and all its children (loader workers, DALI threads) spent in the timed window: the loader's cost per
core, independent of how many cores it got on a shared machine. A table is printed last; --out writes
the results as JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from common import env_info, first_line, format_table, sync, write_json
from PIL import Image

from moca_fast.config import load_config
from moca_fast.data import build_train_loader
from moca_fast.data.scan import scan_images
from moca_fast.data.scan_cache import cache_root

PHOTO_SIZE = (500, 375)  # a typical ImageNet training image


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI smoke run: 48 small images, 64 px views, 3 batches")
    p.add_argument("--data", default=None, help="image folder (default: generated photo-like JPEGs)")
    p.add_argument("--images", type=int, default=None, help="generated images (default 512; 48 with --small)")
    p.add_argument("--img-size", type=int, default=None, help="view size (default 224; 64 with --small)")
    p.add_argument("--batch", type=int, default=None, help="pairs per batch (default 256 on a GPU, 32 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed batches per row (default 20 GPU, 6 CPU; 3 small)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches after the first (default 1)")
    p.add_argument("--workers", default=None, help="comma list of worker/thread counts (default: all cores)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def photo_like_jpegs(count: int, size: tuple[int, int]) -> Path:
    """`count` smooth colour fields with noise (JPEG quality 90), written once under the cache."""
    root = cache_root() / "bench_data" / f"{size[0]}x{size[1]}_{count}"
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.clip(np.asarray(low, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)
    done.touch()
    return root


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def time_loader(make_loader, device: torch.device, warmup: int, steps: int) -> dict:
    """Builds a loader, takes 1 + warmup batches untimed, then times `steps` batches (across epochs)."""
    started = time.perf_counter()
    loader = make_loader()
    batches, timed_from, startup = 0, None, None
    epoch = 0
    while batches < 1 + warmup + steps:
        loader.set_epoch(epoch)
        for x1, x2 in loader:
            batches += 1
            if batches == 1:
                sync(device)
                startup = time.perf_counter() - started
            if batches == 1 + warmup:
                sync(device)
                timed_from, cpu_from = time.perf_counter(), cpu_seconds()
            if batches == 1 + warmup + steps:
                break
        epoch += 1
    sync(device)
    seconds, cpu = time.perf_counter() - timed_from, cpu_seconds() - cpu_from
    pairs = steps * x1.shape[0]
    # a loader faster than the CPU clock's tick (synthetic) reads no CPU time: no ratio rather than a division by 0
    return {"pairs_per_s": pairs / seconds, "pairs_per_cpu_s": pairs / cpu if cpu > 0 else None, "startup_s": startup,
            "timed_pairs": pairs, "view_shape": list(x1.shape[1:])}


def nvjpeg_decode_only(files: list[str], batch: int, warmup: int, steps: int) -> dict:
    """torchvision.io.decode_jpeg(device="cuda") on batches of in-memory JPEG bytes."""
    from torchvision.io import decode_jpeg, read_file

    data = [read_file(f) for f in files[:batch]]
    for _ in range(1 + warmup):
        decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    return {"pairs_per_s": steps * len(data) / (time.perf_counter() - started), "timed_pairs": steps * len(data)}


def rows_to_run(args, device: torch.device, workers: list[int]) -> list[dict]:
    rows = [{"backend": "synthetic", "workers": 0, "device": device.type}]
    rows += [{"backend": "torch", "workers": n, "device": device.type} for n in workers]
    rows += [{"backend": "dali-cpu", "workers": n, "device": "cpu"} for n in workers]
    if device.type == "cuda":
        rows += [{"backend": "dali-gpu", "workers": max(workers), "device": "cuda"},
                 {"backend": "nvjpeg-decode-only", "workers": 0, "device": "cuda"}]
    return rows


def run_row(row: dict, cfg, data: str, args) -> dict:
    device = torch.device(row["device"])
    backend = {"dali-cpu": "dali", "dali-gpu": "dali"}.get(row["backend"], row["backend"])
    try:
        if row["backend"] == "nvjpeg-decode-only":
            files = [f for f in scan_images(data).files if f.lower().endswith((".jpg", ".jpeg"))]
            return {**row, **nvjpeg_decode_only(files, cfg.batch_size, args.warmup, args.steps), "status": "ok"}
        if backend == "dali":
            import moca_fast.data.dali  # noqa: F401  (missing DALI: this row reports it)
        row_cfg = cfg.replace(data_backend=backend, num_workers=row["workers"])
        result = time_loader(lambda: build_train_loader(row_cfg, 0, 1, device), device, args.warmup, args.steps)
        return {**row, **result, "status": "ok"}
    except ImportError as e:
        return {**row, "status": f"missing: {first_line(e)}"}
    except Exception as e:  # one failing backend must not hide the others' numbers
        return {**row, "status": f"failed: {first_line(e)}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [cores]
    images = args.images or (48 if args.small else 512)
    args.steps = args.steps or (3 if args.small else 20 if device.type == "cuda" else 6)
    batch = args.batch or (8 if args.small else 256 if device.type == "cuda" else 32)
    img_size = args.img_size or (64 if args.small else 224)
    data = args.data or str(photo_like_jpegs(images, (160, 120) if args.small else PHOTO_SIZE))
    cfg = load_config("vit_base_dec2", overrides=dict(data=data, img_size=img_size, batch_size=batch, seed=0))
    scan_images(data)  # once, so that no row's startup includes checking the files
    rows = []
    for row in rows_to_run(args, device, workers):
        rows.append(run_row(row, cfg, data, args))
        print(f"{row['backend']:>18} workers={row['workers']}: {rows[-1]['status']}", file=sys.stderr)
    write_json(args.out, {"env": env_info(device), "data": data, "img_size": img_size, "batch": batch,
                          "steps": args.steps, "rows": rows})
    print(format_table(rows, [("backend", "backend", ""), ("workers", "workers", ""), ("device", "device", ""),
                              ("pairs/s", "pairs_per_s", ".1f"), ("pairs/cpu-s", "pairs_per_cpu_s", ".1f"),
                              ("startup s", "startup_s", ".2f"),
                              ("status", "status", "")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
