"""Loader-only throughput: image pairs per second out of each data backend, no model.

    python bench/data.py                      # 512 generated 500x375 JPEGs, 224 px views
    python bench/data.py --data /imagenet/train --batch 256 --steps 50
    python bench/data.py --small              # CI smoke run: tiny images, a few batches, seconds

Rows (each reports ok / missing / failed: why): synthetic (random tensors on the device), torch
(DataLoader + PIL) with each --workers count, nvjpeg (the backend decoding JPEGs on the device with torchvision;
libjpeg on the CPU), DALI on the CPU (device_id=None, threads = workers),
and with a GPU: DALI's nvJPEG pipeline and torchvision's nvJPEG batch decode (decode only, no
augmentation: the GPU decode ceiling where DALI cannot be installed). With --split (or by default on the
CPU) three more rows go through the same torch DataLoader harness (workers, keys, collation) and count only the
CPU work that stays on the CPU when a GPU is present (the workers' work, the hand-off to the main process,
collation): "official" (PIL decode + the official DataAugmentationTwoViews, float32 out, all of it CPU work;
imported from util/transforms.py under MOCA_OFFICIAL_DIR, a valeoai/MOCA checkout), "pil-host" (the PIL-only
path, photometric_on=workers, uint8 out) and "split-host" (decode, crops, flips, photometric_on=device); then the
split path's device part (the photometric operations and the normalisation of both views) is timed per batch
on the bench's device, and the ratio of the official to the split path's CPU seconds per pair printed.
pairs/s is one image's two views per pair, the unit of the trainer's img/s; a loader keeps up when its pairs/s is at least
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
import resource
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
    p.add_argument("--backends", default=None,
                   help="comma list of the rows to run (default: all); a row this device lacks reports skipped")
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=None,
                   help="the official / PIL-only / split CPU-work rows and the device part (default: on the CPU)")
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
    """User + system CPU seconds of this process, its live descendants and the children it has reaped (loader
    workers that ended at an epoch's end: without them a timed span that crosses an epoch loses their time)."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = reaped.ru_utime + reaped.ru_stime
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


class HostPart:
    """The torch backend's batches as the workers hand them over (uint8 views, before the device part)."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for view1, view2, *_ in self.loader.host_batches():
            yield view1, view2


class OfficialTwoViews:
    """The official pipeline per image: ImageFolder's PIL loader, then DataAugmentationTwoViews (float32 out;
    it draws from the global generators, the rng is unused)."""

    def __init__(self, img_size: int, crop_min: float):
        official = os.environ.get("MOCA_OFFICIAL_DIR")
        if not official or not (Path(official) / "util" / "transforms.py").is_file():
            raise ImportError("set MOCA_OFFICIAL_DIR to a valeoai/MOCA checkout")
        sys.path.insert(0, official)
        from util.transforms import DataAugmentationTwoViews

        self.augment = DataAugmentationTwoViews(img_size, crop_min)

    def __call__(self, path: str, rng):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return tuple(self.augment(img))


def host_part_loader(row: dict, cfg):
    """A torch-backend loader of this row's worker-side work, iterated up to the hand-off."""
    from moca_fast.data.torch_backend import TorchTwoViewLoader

    images = scan_images(cfg.data)
    setting = {"official": "workers", "pil-host": "workers", "split-host": "device"}[row["backend"]]
    read_views = OfficialTwoViews(cfg.img_size, cfg.crop_min) if row["backend"] == "official" else None
    row_cfg = cfg.replace(data_backend="torch", photometric_on=setting, num_workers=row["workers"])
    return HostPart(TorchTwoViewLoader(images, row_cfg, 0, 1, "cpu", read_views=read_views))


def device_part(cfg, device: torch.device, steps: int) -> dict:
    """The split path's device part on one batch (both views' photometric operations + normalisation), per batch:
    wall ms (synchronised) and, on the CPU, CPU ms of this process."""
    from moca_fast.data.photometric import Photometric
    from moca_fast.data.transforms import Normalizer

    loader = host_part_loader({"backend": "split-host", "workers": 0}, cfg).loader
    view1, view2, params, _ = next(iter(loader.host_batches()))
    views = [view.to(device) for view in (view1, view2)]
    photometric, normalize = Photometric(), Normalizer(device)

    def once():
        return [normalize(photometric(view, params[:, k])) for k, view in enumerate(views)]

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the cost per core: several threads on a shared machine measure its load
    try:
        once()
        sync(device)
        started, cpu_from = time.perf_counter(), time.process_time()
        for _ in range(steps):
            once()
        sync(device)
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_from
    finally:
        torch.set_num_threads(threads)
    return {"device": device.type, "batch": view1.shape[0], "ms_per_batch": wall_s * 1e3 / steps,
            "cpu_ms_per_batch": cpu_s * 1e3 / steps if device.type == "cpu" else None,
            "threads": 1 if device.type == "cpu" else None}


def rows_to_run(args, device: torch.device, workers: list[int]) -> list[dict]:
    rows = [{"backend": "synthetic", "workers": 0, "device": device.type}]
    rows += [{"backend": "torch", "workers": n, "device": device.type} for n in workers]
    if args.split:
        rows += [{"backend": name, "workers": n, "device": "cpu"}
                 for name in ("official", "pil-host", "split-host") for n in workers]
    rows += [{"backend": "nvjpeg", "workers": n, "device": device.type} for n in workers]
    rows += [{"backend": "dali-cpu", "workers": n, "device": "cpu"} for n in workers]
    if device.type == "cuda":
        rows += [{"backend": "dali-gpu", "workers": max(workers), "device": "cuda"},
                 {"backend": "nvjpeg-decode-only", "workers": 0, "device": "cuda"}]
    if args.backends:
        wanted = args.backends.split(",")
        rows = [row for row in rows if row["backend"] in wanted]
        rows += [{"backend": name, "workers": 0, "device": device.type, "status": "skipped: needs a CUDA device"}
                 for name in wanted if name not in {row["backend"] for row in rows}]
    return rows


def run_row(row: dict, cfg, data: str, args) -> dict:
    device = torch.device(row["device"])
    backend = {"dali-cpu": "dali", "dali-gpu": "dali"}.get(row["backend"], row["backend"])
    try:
        if row["backend"] == "nvjpeg-decode-only":
            files = [f for f in scan_images(data).files if f.lower().endswith((".jpg", ".jpeg"))]
            return {**row, **nvjpeg_decode_only(files, cfg.batch_size, args.warmup, args.steps), "status": "ok"}
        if row["backend"] in ("official", "pil-host", "split-host"):
            return {**row, **time_loader(lambda: host_part_loader(row, cfg), device, args.warmup, args.steps),
                    "status": "ok"}
        if backend == "dali":
            import moca_fast.data.dali  # noqa: F401  (missing DALI: this row reports it)
        row_cfg = cfg.replace(data_backend=backend, num_workers=row["workers"])
        result = time_loader(lambda: build_train_loader(row_cfg, 0, 1, device), device, args.warmup, args.steps)
        return {**row, **result, "status": "ok"}
    except ImportError as e:
        return {**row, "status": f"missing: {first_line(e)}"}
    except Exception as e:  # one failing backend must not hide the others' numbers
        return {**row, "status": f"failed: {first_line(e)}"}


def split_summary(rows: list[dict], cfg, device: torch.device, steps: int) -> dict:
    """The device part's cost and the official / split CPU-work ratio per worker count, printed."""
    summary = {"device_part": device_part(cfg, device, steps), "official_over_split": {}}
    part = summary["device_part"]
    cpu_text = f" (one thread, {part['cpu_ms_per_batch']:.1f} CPU ms)" if part["device"] == "cpu" else ""
    print(f"device part of the split path (photometric + normalise, both views): {part['ms_per_batch']:.1f} ms per "
          f"batch of {part['batch']} on {part['device']}{cpu_text}")
    by_name = {(r["backend"], r["workers"]): r for r in rows if r["status"] == "ok"}
    for (name, n), row in by_name.items():
        official = by_name.get(("official", n))
        if name == "split-host" and official is not None:
            ratio = row["pairs_per_cpu_s"] / official["pairs_per_cpu_s"]
            summary["official_over_split"][n] = ratio
            costs = {label: by_name[(key, n)]["pairs_per_cpu_s"] for label, key in (
                ("official", "official"), ("PIL-only", "pil-host"), ("split", "split-host")) if (key, n) in by_name}
            print(f"CPU work per pair, workers={n}: " + ", ".join(f"{label} {1e3 / rate:.2f} ms" for label, rate in
                                                                  costs.items())
                  + f": the split path's is {ratio:.2f}x below the official's")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [cores]
    images = args.images or (48 if args.small else 512)
    args.steps = args.steps or (3 if args.small else 20 if device.type == "cuda" else 6)
    args.split = device.type == "cpu" if args.split is None else args.split
    batch = args.batch or (8 if args.small else 256 if device.type == "cuda" else 32)
    img_size = args.img_size or (64 if args.small else 224)
    data = args.data or str(photo_like_jpegs(images, (160, 120) if args.small else PHOTO_SIZE))
    cfg = load_config("vit_base_dec2", overrides=dict(data=data, img_size=img_size, batch_size=batch, seed=0))
    scan_images(data)  # once, so that no row's startup includes checking the files
    rows = []
    for row in rows_to_run(args, device, workers):
        rows.append(row if "status" in row else run_row(row, cfg, data, args))
        print(f"{row['backend']:>18} workers={row['workers']}: {rows[-1]['status']}", file=sys.stderr)
    split = split_summary(rows, cfg, device, args.steps) if args.split else None
    write_json(args.out, {"env": env_info(device), "data": data, "img_size": img_size, "batch": batch,
                          "steps": args.steps, "rows": rows, "split": split})
    print(format_table(rows, [("backend", "backend", ""), ("workers", "workers", ""), ("device", "device", ""),
                              ("pairs/s", "pairs_per_s", ".1f"), ("pairs/cpu-s", "pairs_per_cpu_s", ".1f"),
                              ("startup s", "startup_s", ".2f"),
                              ("status", "status", "")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
