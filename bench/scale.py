"""Start-up, worker memory and loader cost at ImageNet scale: measured here, extrapolated to 1.28 M files.

    python -m bench scale                   # 8,000 generated JPEGs (500x375, ~100 KB, 100 class folders)
    python -m bench scale --files 40000     # the size issue 22 measured (~4 GB of JPEGs)
    python -m bench scale --small           # CI smoke run: 240 small JPEGs, 20 k paths, seconds

Measured, in this order:
  1. scan files/s: the first scan with 1 and with 2 worker processes (journals removed before each) and
     the cached re-scan with 1 and 2 (every verdict in the journals: listing, stat, journal reads);
  2. time to first step: `deepspeed --num_gpus 2 launch/train.py` (two gloo CPU ranks, tiny preset, torch
     backend) on the folder, first without journals (rank 0 scans, rank 1 waits on its heartbeat), then
     with them: seconds from the launch to the first metrics line;
  3. the ImageList of 1.28 M synthetic paths: pickled and unpickled (what on_rank0 broadcasts);
  4. loader worker USS over --epochs epochs at 1.28 M synthetic paths (no files: the decode and the
     augmentation are replaced by constants, the worker reads every path of the list each epoch);
  5. loader pairs per CPU-second: bench/data.py's torch and DALI-CPU rows (224 px views).
Then the extrapolation to 1.28 M files on a 16-core node with local NVMe storage, the arithmetic
printed: the scan runs on the 16 cores at the per-process rate measured with 2 processes here (both
cores busy), everything in the time to first step that is not the scan (launcher, imports, DeepSpeed,
the list's broadcast) is taken from the measured cached run, plus the broadcast of the larger list.
Files are read from the page cache here (they were just written): storage slower than the scan's
demand (files/s x bytes per file) makes the first scan I/O bound instead.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import psutil
from common import format_table, write_json
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moca_fast.data.image_list import synthetic_image_list  # noqa: E402
from moca_fast.data.scan import scan_images  # noqa: E402
from moca_fast.data.scan_cache import journal_folder, scans_folder  # noqa: E402
from moca_fast.distributed import free_port  # noqa: E402

IMAGENET_FILES = 1_281_167
NODE_CORES = 16
GPU_IMG_PER_S = 900  # a ViT-B step on an H100 (DESIGN.md section 4): the pairs/s one GPU's loader must give
PHOTO = (500, 375)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI smoke run: 240 small JPEGs, 20,000 paths, 2 epochs")
    p.add_argument("--files", type=int, default=None, help="generated JPEGs (default 8,000)")
    p.add_argument("--paths", type=int, default=None, help="synthetic paths of the memory part (default 1,281,167)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the memory part (default 8)")
    p.add_argument("--dir", default=None, help="where the JPEGs go (default: a temporary folder, removed after)")
    p.add_argument("--parts", default="scan,first_step,broadcast,memory,loaders",
                   help="what to measure (comma list); the others are taken from --reuse")
    p.add_argument("--reuse", default=None, help="a JSON written by an earlier run: the parts not measured now")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _write_photo(task) -> int:
    path, seed, size = task
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.clip(np.asarray(low, np.float32) + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return os.path.getsize(path)


def make_jpegs(root: Path, count: int, size: tuple[int, int], classes: int) -> float:
    """`count` photo-like JPEGs in `classes` folders, written on every core; returns the mean file size."""
    tasks = []
    for i in range(count):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((str(folder / f"{i:07d}.JPEG"), i, size))
    with get_context("fork").Pool(os.cpu_count()) as pool:
        sizes = pool.map(_write_photo, tasks, chunksize=64)
    return float(np.mean(sizes))


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that ended (the scan's workers are reaped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_scan(root: Path, processes: int, cold: bool) -> dict:
    """Wall time and CPU time (this process + its workers) of one scan: files per CPU-second is what one
    dedicated core does, whatever else shares the cores here."""
    if cold:
        shutil.rmtree(journal_folder(root, scans_folder()), ignore_errors=True)
    stats: dict = {}
    started, cpu = time.perf_counter(), cpu_seconds()
    images = scan_images(root, processes=processes, progress=False, stats=stats)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"what": f"{'first' if cold else 'cached'} scan", "processes": processes, "files": len(images),
            "seconds": seconds, "files_per_s": len(images) / seconds, "cpu_s": cpu,
            "files_per_cpu_s": len(images) / cpu, "checked": stats["checked"]}


def time_to_first_step(root: Path, output: Path, cold: bool) -> dict:
    """Seconds from `deepspeed --num_gpus 2 launch/train.py` to the first metrics line."""
    if cold:
        shutil.rmtree(journal_folder(root, scans_folder()), ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
               "--preset", "tiny", "--data", str(root), "--output", str(output), "--max-steps", "1",
               "--batch-size", "8", "--data-backend", "torch", "log_every=1", "num_workers=1", "ckpt_every=1000"]
    started = time.perf_counter()
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, first_step = output / "metrics.jsonl", None
    while run.poll() is None and first_step is None:
        if metrics.is_file() and metrics.read_text().strip():
            first_step = time.perf_counter() - started
        time.sleep(0.05)
    error = run.communicate(timeout=600)[1]
    if first_step is None:
        raise RuntimeError(f"the 2-rank run ended (status {run.returncode}) before step 1: {error[-1500:]}")
    return {"what": f"time to first step, 2 ranks, {'new folder' if cold else 'cached verdicts'}",
            "seconds": first_step}


def list_broadcast(paths: int) -> dict:
    images = synthetic_image_list(paths)
    started = time.perf_counter()
    blob = pickle.dumps(images)
    pickle.loads(blob)
    return {"what": f"ImageList of {paths:,} paths pickled + unpickled", "seconds": time.perf_counter() - started,
            "mb": len(blob) / 2**20}


class _ConstantViews:
    def __init__(self, *args):
        import torch

        self.views = torch.zeros(3, 1, 1, dtype=torch.uint8), torch.zeros(3, 1, 1, dtype=torch.uint8)

    def __call__(self, image, rng):
        return self.views


def worker_uss(paths: int, epochs: int) -> dict:
    """USS of the loader's one worker after its first batch and after each epoch, MB."""
    from moca_fast.config import load_config
    from moca_fast.data import torch_backend

    torch_backend.open_rgb, torch_backend.TwoViewTransform = len, _ConstantViews
    torch_backend.sample_rng = lambda *key: None
    cfg = load_config("tiny", overrides=dict(batch_size=8192, num_workers=1, seed=0))
    loader = torch_backend.TorchTwoViewLoader(synthetic_image_list(paths), cfg, 0, 1, "cpu")
    uss = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for step, _ in enumerate(loader):
            if not uss:
                uss.append(_uss_mb(loader))
        gc.collect()  # a full collection in the parent, as a training process runs them
        uss.append(_uss_mb(loader))
    return {"what": f"loader worker USS over {epochs} epochs, {paths:,} paths", "uss_mb": uss,
            "growth_mb": max(uss) - uss[0]}


def _uss_mb(loader) -> float:
    worker, = loader._loader._iterator._workers
    return psutil.Process(worker.pid).memory_full_info().uss / 2**20


def loader_cost(small: bool, out: Path) -> list[dict]:
    command = [sys.executable, str(REPO / "bench" / "data.py"), "--workers", "2", "--out", str(out)]
    command += ["--small"] if small else ["--images", "256", "--steps", "4", "--batch", "32"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    return [r for r in rows if r["backend"] in ("torch", "dali-cpu") and r["status"] == "ok"]


def extrapolate(r: dict) -> list[str]:
    """The arithmetic from the measured figures to 1.28 M files on a 16-core node."""
    n, cores = IMAGENET_FILES, NODE_CORES
    lines = []
    if "scan" in r:
        first1, first2, cached2 = r["scan"]["first_1"], r["scan"]["first_2"], r["scan"]["cached_2"]
        # one scan process per dedicated core checks files_per_cpu_s (measured with 2 processes: overheads in)
        per_proc, cached_per_proc = first2["files_per_cpu_s"], cached2["files_per_cpu_s"]
        cold_scan, warm_scan = n / (per_proc * cores), n / (cached_per_proc * cores)
        lines += [
            f"scan scaling here (wall clock): {first2['files_per_s']:,.0f} files/s with 2 processes / "
            f"{first1['files_per_s']:,.0f} with 1 = {r['scaling']:.2f}x (target >= 1.8x)",
            f"scan cost per file: {1000 / first1['files_per_cpu_s']:.2f} CPU-ms with 1 process, "
            f"{1000 / first2['files_per_cpu_s']:.2f} with 2 (work per file that does not grow with processes: "
            f"{first2['files_per_cpu_s'] / first1['files_per_cpu_s']:.2f} of the 1-process rate per CPU-second)",
            f"first scan, 16 cores: {n:,} files / ({per_proc:,.0f} files per CPU-second x {cores}) = "
            f"{cold_scan:,.0f} s (reads {n * r['mean_file_kb'] / 1024 / cold_scan:,.0f} MB/s: the storage must "
            f"give that)",
            f"cached re-scan, 16 cores: {n:,} / ({cached_per_proc:,.0f} files per CPU-second x {cores}) = "
            f"{warm_scan:,.1f} s"]
        if {"first_step_cached", "broadcast"} <= set(r):
            fixed = r["first_step_cached"]["seconds"] - cached2["seconds"]
            bcast = r["broadcast"]["seconds"]
            lines += [
                f"fixed start-up (launcher, imports, DeepSpeed, 2 ranks): {r['first_step_cached']['seconds']:.1f} s "
                f"to step 1 with cached verdicts - {cached2['seconds']:.1f} s cached scan = {fixed:.1f} s",
                f"list broadcast: {bcast:.2f} s ({r['broadcast']['what']}, {r['broadcast']['mb']:.0f} MB)",
                f"time to first step, new 1.28 M-file folder: {fixed:.1f} + {cold_scan:,.0f} + {bcast:.1f} = "
                f"{fixed + cold_scan + bcast:,.0f} s (target <= 180 s)",
                f"time to first step, cached verdicts: {fixed:.1f} + {warm_scan:.1f} + {bcast:.1f} = "
                f"{fixed + warm_scan + bcast:.1f} s (target <= 10 s)"]
    if "uss" in r:
        lines.append(f"worker USS growth over {len(r['uss']['uss_mb']) - 1} epochs at {r['paths']:,} paths: "
                     f"{r['uss']['growth_mb']:+.1f} MB (target <= 5 MB)")
    for row in r.get("loaders", []):
        lines.append(f"{row['backend']} loader: {row['pairs_per_cpu_s']:.1f} pairs per CPU-second -> "
                     f"{GPU_IMG_PER_S} img/s per GPU needs {GPU_IMG_PER_S / row['pairs_per_cpu_s']:.1f} cores per GPU")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    files = args.files or (240 if args.small else 8000)
    paths = args.paths or (20_000 if args.small else IMAGENET_FILES)
    epochs = args.epochs or (2 if args.small else 8)
    parts = set(args.parts.split(","))
    r: dict = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moca_scale_"))
    root = work / "train"
    try:
        if parts & {"scan", "first_step"}:
            size = (160, 120) if args.small else PHOTO
            print(f"writing {files:,} JPEGs of {size[0]}x{size[1]} to {root} ...", file=sys.stderr)
            r.update(files=files, cores_here=len(os.sched_getaffinity(0)),
                     mean_file_kb=make_jpegs(root, files, size, classes=max(2, files // 80)) / 1024)
        if "scan" in parts:
            r["scan"] = {f"{'first' if cold else 'cached'}_{p}": timed_scan(root, p, cold)
                         for cold in (True, False) for p in (1, 2)}
            r["scaling"] = r["scan"]["first_2"]["files_per_s"] / r["scan"]["first_1"]["files_per_s"]
        if "first_step" in parts:
            print("time to first step (2 ranks) ...", file=sys.stderr)
            r["first_step_new"] = time_to_first_step(root, work / "run", cold=True)
            r["first_step_cached"] = time_to_first_step(root, work / "run", cold=False)
        if "broadcast" in parts:
            r["broadcast"] = list_broadcast(IMAGENET_FILES if not args.small else paths)
        if "memory" in parts:
            print("worker memory ...", file=sys.stderr)
            r["paths"], r["uss"] = paths, worker_uss(paths, epochs)
        if "loaders" in parts:
            print("loader cost ...", file=sys.stderr)
            r["loaders"] = loader_cost(args.small, work / "data.json")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    r["load_average"] = os.getloadavg()
    write_json(args.out, r)  # the measurements first: nothing measured is lost to a report that fails
    rows = list(r.get("scan", {}).values()) + [r[k] for k in ("first_step_new", "first_step_cached", "broadcast")
                                                if k in r]
    if "files" in r:
        print(f"measured on {r['cores_here']} cores (load average {r['load_average'][0]:.1f} at the end: other "
              f"jobs may share them): {r['files']:,} JPEGs, mean {r['mean_file_kb']:.0f} KB")
    print(format_table(rows, [("what", "what", ""), ("processes", "processes", ""), ("files", "files", ""),
                              ("seconds", "seconds", ".2f"), ("files/s", "files_per_s", ",.0f"),
                              ("CPU s", "cpu_s", ".2f"), ("files/CPU-s", "files_per_cpu_s", ",.0f")]))
    if "uss" in r:
        print(f"worker USS (MB) after the first batch and each epoch: {[round(u, 1) for u in r['uss']['uss_mb']]}")
    if "loaders" in r:
        print(format_table(r["loaders"], [("loader", "backend", ""), ("workers", "workers", ""),
                                          ("pairs/s", "pairs_per_s", ".1f"),
                                          ("pairs/cpu-s", "pairs_per_cpu_s", ".1f")]))
    r["extrapolation"] = extrapolate(r)
    print(f"\nextrapolated to {IMAGENET_FILES:,} files on a {NODE_CORES}-core node:")
    print("\n".join(f"  {line}" for line in r["extrapolation"]))
    write_json(args.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
