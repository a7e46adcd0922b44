"""End-to-end training throughput: reference vs fast path, side by side in one run.

    python -m bench throughput                     # ViT-B/16, batch 256, bf16, synthetic data, CUDA
    python -m bench throughput --data /imagenet    # the same with the real loader in the loop
    python -m bench throughput --small             # CI smoke run: tiny preset on the CPU, seconds

Per variant (bench/steps.py): img/s (an image = one pair of views), median step time, MFU, peak
memory. MFU = FLOPs of one step counted by torch.utils.flop_counter on the reference path (the
fused kernels are opaque to the counter; the work is the same) / step time / the bf16 matmul
ceiling measured in the same run. A table is printed last; --out writes everything as JSON.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

if "--small" in sys.argv[1:]:  # CPU run: the Triton kernels need the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from common import (OFFICIAL_EAGER_IMG_PER_S, StepTimer, allocated_memory, count_host_syncs,  # noqa: E402
                    env_info, format_table, free_memory, gpu_family, measure_matmul_tflops, peak_memory, pick_device,
                    run_variants, preset_name, reset_peak_memory, summarize_ms, sync, write_json)
from flops import analytic_step_flops, count_flops  # noqa: E402
from steps import (COMPILE_ONLY, ON_REQUEST, PRECISION, VARIANTS, Batches, VariantUnavailable,  # noqa: E402
                   fused_kernels_missing, make_step)
from moca_fast.config import Config, load_config  # noqa: E402
from moca_fast.errors import ConfigError  # noqa: E402

DESIGN_GFLOP_PER_IMG = 245.0  # DESIGN §4, MOCA ViT-B/16 step, per image pair
# --small: the tiny preset on 4x4 patches of 2 image pairs (the interpreted Triton kernels cost
# seconds per step on the CPU, in proportion to the tokens)
SMALL_OVERRIDES = dict(img_size=32, skip_offset=1, batch_size=2, num_new_words=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny preset on the CPU, a few steps (CI smoke run)")
    p.add_argument("--preset", default=None, help="model preset (default vit_base_dec2; tiny with --small)")
    p.add_argument("--batch", type=int, default=None, help="image pairs per step (default 256; 2 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 2 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 3; 1)")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: all but "
                                                      f"{', '.join(ON_REQUEST)}; without compilation "
                                                      f"{', '.join(COMPILE_ONLY)} are left out too)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the blocks in the fast variants (auto: on CUDA only)")
    p.add_argument("--data", default=None, help="image folder: time the real loader (build_train_loader) in the loop")
    p.add_argument("--workers", type=int, default=None, help="loader workers with --data (default: the preset's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace):
    """(device, cfg, variant names, compile flag) from the arguments, with one-line errors."""
    device = pick_device(args.small)
    if device.type != "cuda" and not args.small:
        raise ConfigError("no CUDA device: the full benchmark needs a GPU (use --small for the CPU smoke run)")
    preset = args.preset or ("tiny" if args.small else "vit_base_dec2")
    overrides = {"data": args.data, "data_backend": "auto" if args.data else "synthetic", "batch_size": 256}
    if args.small:
        overrides.update(SMALL_OVERRIDES)
    if args.batch is not None:
        overrides["batch_size"] = args.batch
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    cfg = load_config(preset, overrides=overrides).validate(1)
    compile_blocks = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    default = [n for n in VARIANTS if n not in ON_REQUEST and (compile_blocks or n not in COMPILE_ONLY)]
    names = args.variants.split(",") if args.variants else default
    for n in names:
        if n not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {n!r}; choose from {', '.join(VARIANTS)}")
    return device, cfg, names, compile_blocks


@dataclass
class BenchRun:
    """What both end-to-end benchmarks start from: the resolved arguments and the batch source."""

    device: torch.device
    cfg: Config
    names: list[str]
    compile_blocks: bool
    warmup: int
    steps: int
    batches: Batches


def start(args: argparse.Namespace, default_steps: tuple[int, int]) -> BenchRun:
    """resolve(args) (exits with its one-line error), the warm-up and timed step counts (--warmup /
    --steps, else 1 / default_steps[0] with --small and 3 / default_steps[1] without), the seed, the batches."""
    try:
        device, cfg, names, compile_blocks = resolve(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    steps = args.steps if args.steps is not None else default_steps[0 if args.small else 1]
    torch.manual_seed(cfg.seed)
    return BenchRun(device, cfg, names, compile_blocks, warmup, steps, Batches(cfg, device))


def count_step_flops(cfg, device, batches: Batches) -> tuple[int, dict[str, int]]:
    """FLOPs of one full training step of the reference path at this batch size."""
    step = make_step("reference", cfg, device)
    views = batches.next()
    return count_flops(lambda: step(*views))


def run_variant(name: str, cfg, device, batches: Batches, warmup: int, steps: int, compile_blocks: bool) -> dict:
    from torch._dynamo.utils import counters

    held = allocated_memory(device)
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    step = make_step(name, cfg, device, compile_blocks)
    for _ in range(warmup):
        loss = step(*batches.next())
    sync(device)
    warmup_s = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"] - graphs
    reset_peak_memory(device)
    times, loss = time_steps(step, batches, steps, device)
    loss_value = loss.item()
    result = {"status": "ok", "summary": step.spec.summary, "attention_backend": step.attention_backend,
              "warmup_s": warmup_s, "compiled_graphs": graphs, "loss": loss_value, "step_ms": times,
              **summarize_ms(times), **peak_memory(device, held),
              "host_syncs_per_step": count_host_syncs(device, lambda: step(*batches.next()))}
    if not math.isfinite(loss_value):
        result["status"] = f"failed: non-finite loss {loss_value}"
    if step.spec.deepspeed_defaults:
        step.deepspeed_defaults()
        time_steps(step, batches, 2, device)
        times, _ = time_steps(step, batches, steps, device)
        result["with_deepspeed_defaults"] = {
            "step_ms": times, **summarize_ms(times),
            "host_syncs_per_step": count_host_syncs(device, lambda: step(*batches.next()))}
        result["deepspeed_defaults_slowdown"] = statistics.median(times) / result["step_ms_median"]
    return result


def time_steps(step, batches: Batches, steps: int, device) -> tuple[list[float], torch.Tensor | None]:
    """(per-step ms of `steps` steps, the last step's loss)."""
    loss = None
    timer = StepTimer(device)
    timer.mark()
    for _ in range(steps):
        loss = step(*batches.next())
        timer.mark()
    return timer.step_ms(), loss


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = start(args, default_steps=(2, 10))
    device, cfg, names, compile_blocks = run.device, run.cfg, run.names, run.compile_blocks
    warmup, steps, batches = run.warmup, run.steps, run.batches
    B = cfg.batch_size
    peak = measure_matmul_tflops(device)
    flops, flops_per_op = count_step_flops(cfg, device, batches)
    free_memory(device)
    analytic = analytic_step_flops(cfg, B)

    def add_rates(results: dict) -> dict:
        """img/s, achieved TFLOP/s, MFU of the variants that ran, and their speed-up over the reference."""
        for r in results.values():
            if r["status"] == "ok":
                r["img_per_s"] = B / (r["step_ms_median"] / 1e3)
                r["achieved_tflops"] = flops / (r["step_ms_median"] / 1e3) / 1e12
                r["mfu"] = r["achieved_tflops"] / peak["peak_tflops"]
        ref = results.get("reference", {}).get("img_per_s")
        for r in results.values():
            if ref and r.get("img_per_s"):
                r["speedup_vs_reference"] = r["img_per_s"] / ref
        return results

    results = run_variants(names, lambda name: run_variant(name, cfg, device, batches, warmup, steps,
                                                           compile_blocks), device, VariantUnavailable,
                           after_each=lambda done: write_json(args.out, {"benchmark": "throughput", "partial": True,
                                                                         **peak, "variants": add_rates(done)}))
    add_rates(results)

    family = gpu_family(device)
    report = {
        "benchmark": "throughput",
        "settings": {"preset": preset_name(args), "batch_size": B, "precision": PRECISION, "device": str(device),
                     "warmup_steps": warmup, "timed_steps": steps, "compile_blocks": compile_blocks,
                     "data_backend": batches.backend, "data": cfg.data},
        "env": env_info(device),
        "fast_kernels": fused_kernels_missing(device) or "ok",
        **peak,
        "flops_per_step": flops, "flops_per_img": flops / B, "flops_per_op": flops_per_op,
        "analytic_flops_per_img": analytic["total"] / B,
        "analytic_flops_by_part": analytic,
        "variants": results,
    }
    if preset_name(args) == "vit_base_dec2":
        report["design_flops_per_img"] = DESIGN_GFLOP_PER_IMG * 1e9
    if family and B == 256:
        report["official_eager_img_per_s"] = {"value": OFFICIAL_EAGER_IMG_PER_S[family], "gpu": family,
                                              "source": "DESIGN §4 (official code, not measured in this run)"}
    write_json(args.out, report)
    print_report(report)
    return report


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"\nMOCA training step, {s['preset']}, batch {s['batch_size']}, {s['precision']}, {s['device']} "
          f"({report['env'].get('gpu', 'CPU: smoke run, not a performance figure')}), data {s['data_backend']}")
    line = (f"FLOPs/img: counted {report['flops_per_img'] / 1e9:.3f} G, "
            f"analytic {report['analytic_flops_per_img'] / 1e9:.3f} G")
    if "design_flops_per_img" in report:
        line += f", DESIGN {report['design_flops_per_img'] / 1e9:.0f} G"
    print(line)
    print(f"matmul ceiling: {report['peak_tflops']:.3g} TFLOP/s ({report['peak_tflops_source']})")
    official = report.get("official_eager_img_per_s")
    if official:
        print(f"official eager on {official['gpu']}: {official['value']:.0f} img/s ({official['source']})")
    rows = []
    for name, r in report["variants"].items():
        row = {"variant": name, **r}
        if r.get("mfu") is not None:
            row["mfu_pct"] = 100 * r["mfu"]
        if official and r.get("img_per_s"):
            row["vs_official"] = r["img_per_s"] / official["value"]
        row["status"] = r["status"] if r["status"] != "ok" else "ok"
        rows.append(row)
    columns = [("variant", "variant", ""), ("img/s", "img_per_s", ".1f"), ("step ms", "step_ms_median", ".2f"),
               ("MFU %", "mfu_pct", ".1f"), ("peak GiB", "peak_mem_gib", ".2f"),
               ("x ref", "speedup_vs_reference", ".2f")]
    if official:
        columns.append(("x official", "vs_official", ".2f"))
    columns += [("syncs/step", "host_syncs_per_step", "d"), ("x DS dflt", "deepspeed_defaults_slowdown", ".3f"),
                ("warm-up s", "warmup_s", ".1f"), ("status", "status", "")]
    print(format_table(rows, columns))


if __name__ == "__main__":
    main()
