"""Where the training step's time goes: torch.profiler over a few steps, time by category.
(The implementation of bench/profile.py.)

    python bench/profile.py                       # reference and fast, ViT-B/16, batch 256, CUDA
    python bench/profile.py --variants fast --steps 5 --trace-dir traces/
    python bench/profile.py --small               # CI smoke run on the CPU (CPU op time)

Categories (bench/breakdown.py): GEMM, attention, normalisation, loss kernels, elementwise,
optimiser, data wait, idle; per step in ms and as a share of the profiled window; plus the host
synchronisations per step. One gzipped Chrome trace per variant (chrome://tracing or
ui.perfetto.dev). A table is printed last; --out writes JSON.
"""
from __future__ import annotations

import os
import sys

if "--small" in sys.argv[1:]:  # CPU run: the Triton kernels need the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, record_function  # noqa: E402

from breakdown import CATEGORIES, breakdown  # noqa: E402
from common import env_info, format_table, preset_name, run_variants, sync, write_json  # noqa: E402
from steps import PRECISION, VARIANTS, Batches, VariantUnavailable, make_step  # noqa: E402
from throughput import start  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny preset on the CPU (CI smoke run)")
    p.add_argument("--preset", default=None, help="model preset (default vit_base_dec2; tiny with --small)")
    p.add_argument("--batch", type=int, default=None, help="image pairs per step (default 256; 2 with --small)")
    p.add_argument("--variants", default="reference,fast", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 3; 1 with --small)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unprofiled steps first, compilation included (default 3; 1 with --small)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the blocks in the fast variants (auto: on CUDA only)")
    p.add_argument("--data", default=None, help="image folder: profile with the real loader (data wait)")
    p.add_argument("--workers", type=int, default=None, help="loader workers with --data")
    p.add_argument("--trace-dir", default=None, help="write <variant>.trace.json.gz here (default: beside --out)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def profile_variant(name: str, cfg, device, batches: Batches, warmup: int, steps: int, compile_blocks: bool,
                    trace_path: Path | None) -> dict:
    step = make_step(name, cfg, device, compile_blocks)
    for _ in range(warmup):
        step(*batches.next())
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("bench.step"):
                loss = step(*batches.next())
        sync(device)
    loss_value = loss.item()
    del step
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
        if trace_path is not None:
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            with open(raw, "rb") as src, gzip.open(trace_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
    result = {"status": "ok", "loss": loss_value, **breakdown(trace, steps)}
    if trace_path is not None:
        result["trace"] = str(trace_path)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = start(args, default_steps=(1, 3))
    device, cfg, names, compile_blocks = run.device, run.cfg, run.names, run.compile_blocks
    warmup, steps, batches = run.warmup, run.steps, run.batches
    trace_dir = Path(args.trace_dir) if args.trace_dir else (Path(args.out).parent if args.out else None)
    results = run_variants(
        names, lambda name: profile_variant(name, cfg, device, batches, warmup, steps, compile_blocks,
                                            trace_dir / f"{name}.trace.json.gz" if trace_dir else None),
        device, VariantUnavailable)
    report = {"benchmark": "profile",
              "settings": {"preset": preset_name(args), "batch_size": cfg.batch_size, "precision": PRECISION,
                           "device": str(device), "warmup_steps": warmup, "profiled_steps": steps,
                           "compile_blocks": compile_blocks, "data_backend": batches.backend},
              "env": env_info(device), "time_base": "GPU kernel time" if device.type == "cuda" else "CPU op self time",
              "variants": results}
    write_json(args.out, report)
    print_report(report)
    return report


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"\nStep time by category, {s['preset']}, batch {s['batch_size']}, {s['device']} "
          f"({report['env'].get('gpu', 'CPU: smoke run, not a performance figure')}), {report['time_base']}, "
          f"ms per step and % of the profiled window")
    ok = {n: r for n, r in report["variants"].items() if r["status"] == "ok"}
    rows = [{"category": c, **{f"{n}_ms": r["ms_per_step"][c] for n, r in ok.items()},
             **{f"{n}_pct": r["pct"][c] for n, r in ok.items()}} for c in CATEGORIES]
    rows.append({"category": "step (window)", **{f"{n}_ms": r["window_ms"] / r["steps"] for n, r in ok.items()}})
    rows.append({"category": "host syncs / step", **{f"{n}_ms": r["host_syncs_per_step"] for n, r in ok.items()}})
    columns = [("category", "category", "")]
    for n in ok:
        columns += [(f"{n} ms", f"{n}_ms", ".2f"), (f"{n} %", f"{n}_pct", ".1f")]
    print(format_table(rows, columns))
    for n, r in report["variants"].items():
        if r["status"] != "ok":
            print(f"{n}: {r['status']}")


if __name__ == "__main__":
    main()
