"""Shared helpers of the end-to-end benchmarks: device, timing, memory, matmul ceiling, env, output."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

GIB = 1024**3

# Official MOCA code, eager, B=256/GPU, bf16 autocast (DESIGN §4): a reference figure, not measured here.
OFFICIAL_EAGER_IMG_PER_S = {"H200": 984.0, "H100": 897.0}


def pick_device(small: bool) -> torch.device:
    """CUDA unless --small (the CPU smoke run) or no GPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_family(device: torch.device) -> str | None:
    """'H100' / 'H200' / ... from the device name, for looking up reference figures."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((fam for fam in OFFICIAL_EAGER_IMG_PER_S if fam in name), None)


class StepTimer:
    """Per-step wall times: CUDA events on a GPU (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Times between consecutive marks, in ms (synchronises once)."""
        sync(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]


def count_host_syncs(device: torch.device, fn) -> int | None:
    """Host synchronisations during fn() on a GPU: the implicit ones (.item(), bool(), .cpu() of a device tensor,
    data-dependent shapes: torch.cuda's sync debug mode) and explicit torch.cuda.synchronize calls (DeepSpeed's
    accelerator makes them). None off CUDA (nothing there synchronises a host with a device)."""
    if device.type != "cuda":
        return None
    import warnings

    explicit = []
    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: explicit.append(1) or synchronize(*args, **kwargs)
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize = synchronize
    return len(explicit) + sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def summarize_ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"step_ms_median": statistics.median(ordered), "step_ms_min": ordered[0], "step_ms_max": ordered[-1]}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_memory(device: torch.device, baseline: int = 0) -> dict[str, float | str]:
    """Peak memory since the last reset: the CUDA allocator's peak less `baseline` (bytes still held
    from before, e.g. by an earlier variant); on CPU the process RSS high-water mark (process-wide,
    so not separable between variants of one run)."""
    if device.type == "cuda":
        return {"peak_mem_gib": (torch.cuda.max_memory_allocated(device) - baseline) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
                "held_before_gib": baseline / GIB, "peak_mem_kind": "cuda_max_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_gib": rss_kib * 1024 / GIB, "peak_mem_kind": "process_rss_high_water"}


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_matmul_tflops(device: torch.device) -> dict[str, float | str]:
    """The dense matmul ceiling, measured here: bf16 8192³ on a GPU, fp32 1024³ on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    timer = StepTimer(device)
    timer.mark()
    reps = 20 if device.type == "cuda" else 5
    for _ in range(reps):
        a @ b
        timer.mark()
    ms = statistics.median(timer.step_ms())
    return {"peak_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
            "peak_tflops_source": f"measured: median {str(dtype).split('.')[-1]} {n}^3 matmul"}


def env_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec); missing values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else format(row[k], f) if f else str(row[k]))
                      for _, k, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path | None, obj: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)


def preset_name(args) -> str:
    """The preset a benchmark runs: --preset, else tiny for --small, else the paper's ViT-B/16."""
    return args.preset or ("tiny" if args.small else "vit_base_dec2")


def run_variants(names, run_one, device: torch.device, unavailable: type[Exception],
                 after_each=None) -> dict[str, dict]:
    """{name: run_one(name)} over the variants; a variant that raises `unavailable` or fails is reported
    in its "status" without hiding the others' results. Device memory is freed after each, and
    after_each(results so far) called (e.g. to write them: a run cut short keeps what it finished)."""
    import traceback

    results = {}
    for name in names:
        try:
            results[name] = run_one(name)
        except unavailable as e:
            results[name] = {"status": f"unavailable: {e}"}
        except Exception as e:  # one failing variant must not hide the others' results
            traceback.print_exc()
            results[name] = {"status": f"failed: {first_line(e)}"}
        free_memory(device)
        if after_each is not None:
            after_each(results)
    return results
