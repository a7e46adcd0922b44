"""Where the training step's time goes: torch.profiler over a few steps, time by category.

    python -m bench profile                       # reference and fast, ViT-B/16, batch 256, CUDA
    python -m bench profile --variants fast --steps 5 --trace-dir traces/
    python -m bench profile --small               # CI smoke run on the CPU (CPU op time)

Categories: GEMM, attention, normalisation, loss kernels, elementwise, optimiser, data wait, idle; per
step in ms and as a share of the profiled window; plus the host synchronisations per step. One gzipped
Chrome trace per variant (chrome://tracing or ui.perfetto.dev). A table is printed last; --out writes JSON.

How a trace becomes categories (`breakdown`). GPU run: every GPU kernel/memcpy/memset is put in one
category by its name, the name of the aten op that launched it (the trace's "External id" link) and the
host time of its launch (the "correlation" link): launched inside an OPTIMIZER_RANGES range -> optimiser,
inside "bench.data" -> data. GPU idle time inside the profiled window is "data wait" where the host was
fetching a batch and "idle" elsewhere. CPU run: the self time of every aten op, categorised the same way,
except that the whole "bench.data" range is data wait (loader workers are other processes); "idle" is then
host time outside any op (Python, the interpreter's own work outside aten ops). GEMM: matmuls,
convolutions; normalisation: LayerNorm, BatchNorm; loss kernels: the fused custom ops, and softmax /
log-softmax / KL of the PyTorch path (whose logit matmuls count as GEMM); elementwise: everything else
(activations, adds, casts, copies, reductions).
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
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, record_function  # noqa: E402

from common import env_info, format_table, preset_name, run_variants, sync, write_json  # noqa: E402
from steps import PRECISION, VARIANTS, Batches, VariantUnavailable, make_step  # noqa: E402
from throughput import start  # noqa: E402


#: profiler ranges whose work is the optimiser's: the benches' own step, and the trainer's engine.step
OPTIMIZER_RANGES = ("bench.optimizer", "train.optimizer")
CATEGORIES = ("GEMM", "attention", "normalisation", "loss kernels", "elementwise", "optimiser", "data wait", "idle")
GPU_EVENT_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                   "cuStreamSynchronize", "cuCtxSynchronize")

_ATTENTION = ("flash", "fmha", "attention", "attn", "sdpa")
_LOSS = ("moca_fast::", "softmax", "kl_div", "xlogy", "codebook", "soft_ce", "soft_target", "token_stats",
         "bow_kernel", "_kl_")
_GEMM = ("gemm", "xmma", "nvjet", "cutlass", "cublas", "triton_tem", "splitk", "conv", "cudnn", "wgrad", "dgrad",
         "aten::mm", "aten::addmm", "aten::_addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
_NORM = ("layer_norm", "layernorm", "batch_norm", "batchnorm", "group_norm", "rms_norm")


def classify(kernel: str, op: str, in_optimizer: bool = False, in_data: bool = False) -> str:
    """The category of one unit of work: a GPU kernel (its name and launching op) or a CPU op (kernel="")."""
    if in_optimizer:
        return "optimiser"
    if in_data:
        return "data wait"
    names = (kernel.lower(), op.lower())
    for category, patterns in (("attention", _ATTENTION), ("loss kernels", _LOSS), ("GEMM", _GEMM),
                               ("normalisation", _NORM)):
        if any(p in name for name in names for p in patterns):
            return category
    return "elementwise"


class Ranges:
    """Sorted, merged host-time intervals [(start, end)] of one annotation name."""

    def __init__(self, intervals):
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.intervals = merged

    def contains(self, t: float) -> bool:
        return any(start <= t <= end for start, end in self.intervals)

    def overlap(self, start: float, end: float) -> float:
        return sum(max(0.0, min(end, e) - max(start, s)) for s, e in self.intervals)


def _complete_events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("dur") is not None]


def _annotations(events: list[dict], *names: str) -> Ranges:
    return Ranges((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name") in names)


def _self_times(ops: list[dict]) -> list[tuple[dict, float]]:
    """(op, self time) per CPU op: its duration less that of the ops nested directly in it, per thread."""
    by_thread = defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, end, children time]
        for e in thread_ops:
            while stack and e["ts"] >= stack[-1][1]:
                done = stack.pop()
                out.append((done[0], done[0]["dur"] - done[2]))
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e, e["ts"] + e["dur"], 0.0])
        out.extend((done[0], done[0]["dur"] - done[2]) for done in stack)
    return out


def _union_length(intervals) -> tuple[float, list[tuple[float, float]]]:
    """Total covered length and the merged intervals."""
    merged = Ranges(intervals).intervals
    return sum(e - s for s, e in merged), [(s, e) for s, e in merged]


def breakdown(trace: dict, steps: int) -> dict:
    """Time per step by category (ms), its share of the profiled window (%), and host syncs per step.

    The window runs from the first "bench.step" range's start to the end of the last one or of the
    last GPU event, whichever is later.
    """
    events = _complete_events(trace)
    step_ranges = _annotations(events, "bench.step").intervals
    if not step_ranges:
        raise ValueError("the trace has no bench.step range: was the step annotated?")
    optimizer, data = _annotations(events, *OPTIMIZER_RANGES), _annotations(events, "bench.data")
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    gpu = [e for e in events if e.get("cat") in GPU_EVENT_CATS]
    window_start, host_end = step_ranges[0][0], step_ranges[-1][1]
    window_end = max([host_end] + [e["ts"] + e["dur"] for e in gpu])
    totals = dict.fromkeys(CATEGORIES, 0.0)

    if gpu:
        op_names = {e["args"]["External id"]: e["name"] for e in ops if "External id" in e.get("args", {})}
        launch_ts = {e["args"]["correlation"]: e["ts"] for e in events
                     if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        for k in gpu:
            args = k.get("args", {})
            t = launch_ts.get(args.get("correlation"), k["ts"])
            category = classify(k["name"], op_names.get(args.get("External id"), ""), optimizer.contains(t),
                                data.contains(t))
            totals[category] += k["dur"]
        busy, merged = _union_length((k["ts"], k["ts"] + k["dur"]) for k in gpu)
        gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(merged, merged[1:])]
        gaps = [(window_start, merged[0][0])] + gaps + [(merged[-1][1], window_end)]
        waited = sum(data.overlap(max(s, window_start), min(e, window_end)) for s, e in gaps if e > s)
        totals["data wait"] += waited
        totals["idle"] = max(0.0, (window_end - window_start) - busy - waited)
        syncs = [e for e in events if e.get("name") in HOST_SYNC_CALLS and window_start <= e["ts"] <= host_end]
    else:
        for op, self_time in _self_times(ops):
            if not data.contains(op["ts"]):
                totals[classify("", op["name"], optimizer.contains(op["ts"]))] += self_time
        totals["data wait"] = data.overlap(window_start, window_end)  # loader work and waiting alike
        busy = sum(totals.values())
        totals["idle"] = max(0.0, (window_end - window_start) - busy)
        syncs = []

    window = window_end - window_start
    return {"window_ms": window / 1e3, "steps": steps, "ms_per_step": {c: totals[c] / 1e3 / steps for c in CATEGORIES},
            "pct": {c: 100.0 * totals[c] / window for c in CATEGORIES},
            "host_syncs_per_step": len(syncs) / steps, "gpu_events": len(gpu)}


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
