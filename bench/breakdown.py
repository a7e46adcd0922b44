"""Where a training step's time goes: categories from a torch.profiler Chrome trace.

GPU run: every GPU kernel/memcpy/memset is put in one category by its name, the name of the aten
op that launched it (the trace's "External id" link) and the host time of its launch (the
"correlation" link): launched inside an OPTIMIZER_RANGES range -> optimiser, inside "bench.data"
-> data. GPU idle time inside the profiled window is "data wait" where the host was fetching a
batch and "idle" elsewhere. CPU run: the self time of every aten op, categorised the same way,
except that the whole "bench.data" range is data wait (loader workers are other processes);
"idle" is then host time outside any op (Python, the interpreter's own work outside aten ops).
Categories: GEMM (matmuls, convolutions), attention, normalisation (LayerNorm, BatchNorm), loss
kernels (the fused custom ops; softmax / log-softmax / KL of the PyTorch path, whose logit
matmuls count as GEMM), elementwise (everything else: activations, adds, casts, copies,
reductions), optimiser, data wait, idle.
"""
from __future__ import annotations

from collections import defaultdict

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
