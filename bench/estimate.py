"""Know the GPU step before renting one: predicted peak memory, the largest batch that fits, FLOPs, and the step
time at the matmul ceiling, for one GPU of a training run. No GPU needed: seconds on a CPU.

    python bench/estimate.py                                  # ViT-B/16, batch 256 per GPU, 1 GPU, the defaults
    python bench/estimate.py --preset vit_large_dec2 --impl fast --zero-stage 2 --world-size 8 --gpu H100
    python bench/estimate.py --config my.yaml --batch-size 384 activation_memory_budget=0.8 --out est.json

Settings as for launch/train.py: preset < --config YAML < flags < key=value (any Config field). The step is
the trainer's own (moca_fast.train.step.train_step: teacher EMA, targets, student, losses, backward, optimiser)
run on fake tensors (moca_fast.fakegpu), bf16 unless precision=fp32, on a stand-in for the DeepSpeed engine
that allocates what DeepSpeed does for the ZeRO stage and world size (bench/estimate_step.py). The peak is what
torch.cuda.max_memory_allocated would report on one GPU (the caching allocator's blocks), split into
parameters, buffers, gradients, optimiser state, inputs, workspaces, activations (saved for the backward) and
transient tensors, with the largest contributors. These are predictions: the same machinery reproduces the
official code's four measured peaks 2.1-3.2 % low (scripts/memory_official.py, tests/test_estimate_calibration.py).
Not included: the CUDA context (~0.5 GiB, outside the allocator), allocator fragmentation (reserved minus
allocated), the data loader's device buffers (DALI's prefetch queue), NCCL buffers.

FLOPs: matrix products and attention of one step (torch.utils.flop_counter's formulas), per image (an image =
a pair of views). The floor of the step time is those FLOPs at the GPU's bf16 matmul ceiling (DESIGN.md §4:
H200 777, H100 766 TFLOP/s), i.e. 100 % MFU; img/s at the ceiling is per GPU and for the run (x world size).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moca_fast.config import load_config  # noqa: E402
from moca_fast.config_parse import parse_kv  # noqa: E402
from moca_fast.errors import ConfigError  # noqa: E402

GIB = 1024**3
#: bf16 dense matmul ceilings measured on the device (DESIGN.md §4), TFLOP/s
MATMUL_TFLOPS = {"H200": 777.0, "H100": 766.0}
CATEGORIES_SHOWN = 6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="vit_base_dec2 (default), vit_large_dec2, vit_small_dec2, tiny or demo")
    p.add_argument("--config", help="YAML file of Config fields (may name its base with `preset: NAME`)")
    p.add_argument("--batch-size", type=int, help="images (pairs of views) per GPU")
    p.add_argument("--world-size", type=int, default=1, help="GPUs of the run (ZeRO partitions over them)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2))
    p.add_argument("--impl", choices=("reference", "fast"))
    p.add_argument("--activation-memory-budget", type=float, help="for the compiled blocks (impl=fast)")
    p.add_argument("--gpu", choices=sorted(MATMUL_TFLOPS), default="H200", help="whose matmul ceiling to use")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB",
                   help="memory the largest batch must fit, GiB of allocated tensors (default 80)")
    p.add_argument("--no-max-batch", action="store_true", help="skip the search for the largest batch")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace):
    flags = {"batch_size": args.batch_size, "zero_stage": args.zero_stage, "impl": args.impl,
             "activation_memory_budget": args.activation_memory_budget}
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_kv(args.overrides))
    cfg = load_config(args.preset, args.config, overrides)
    if args.world_size < 1:
        raise ConfigError(f"--world-size={args.world_size} must be >= 1")
    return cfg.validate(args.world_size)


def precision_of(cfg) -> str:
    return "fp32" if cfg.precision == "fp32" else "bf16"  # "auto" is bf16 on a GPU


def compiled_blocks(cfg) -> bool:
    """Whether a GPU run of cfg compiles its blocks (impl=fast, or compile_blocks=on)."""
    from moca_fast.model.fastpath import trainer_fast_options

    options = trainer_fast_options(cfg, torch.device("cuda"))
    return bool(options and options.compile_blocks)


def measure(cfg, world_size: int) -> dict:
    """One prediction: two training steps on fake tensors (the second is the steady state)."""
    from estimate_step import run_steps

    from moca_fast.fakegpu import fake_gpu

    start = time.perf_counter()
    with fake_gpu() as memory:
        run_steps(cfg, world_size, precision_of(cfg), memory)
    return {"batch_size": cfg.batch_size, "peak_bytes": memory.peak, "breakdown": memory.breakdown(),
            "largest": {c: memory.top_labels(c) for c in ("activations", "transient")},
            "reserved_bytes": memory.allocator.reserved, "step_flops": memory.flops,
            "seconds": time.perf_counter() - start}


def largest_batch(cfg, world_size: int, limit_bytes: float, first: dict, probe=measure) -> dict:
    """The largest batch per GPU whose predicted peak is <= limit_bytes, from the prediction `first` at
    cfg.batch_size. The peak is close to affine in the batch (all but the weights, the optimiser state, the
    workspaces and the fused losses' fixed-size chunks scales with it), so each probe goes where the line through
    the two predictions nearest the limit crosses it; the answer b is confirmed by predictions at b (fits) and
    b + 1 (does not fit)."""
    smallest = max(1, cfg.num_new_words // world_size)  # each rank draws that many words from its batch
    known = {first["batch_size"]: first["peak_bytes"]}
    fixed = sum(first["breakdown"][c] for c in ("parameters", "buffers", "optimizer", "workspace"))
    slope = max(1.0, (first["peak_bytes"] - fixed) / first["batch_size"])
    for _ in range(16):
        lo = max((b for b, p in known.items() if p <= limit_bytes), default=None)
        hi = min((b for b, p in known.items() if p > limit_bytes), default=None)
        if lo is not None and hi == lo + 1:
            break
        if hi == smallest:
            return {"batch_size": None, "reason": f"batch {smallest} (the smallest valid) does not fit",
                    "probes": len(known)}
        nearest = sorted(known, key=lambda b: abs(known[b] - limit_bytes))
        if len(nearest) >= 2:
            a, c = sorted(nearest[:2])
            slope = max(1.0, (known[c] - known[a]) / (c - a))
        anchor = nearest[0]
        guess = anchor + int((limit_bytes - known[anchor]) // slope)
        b = max(guess, lo + 1 if lo is not None else smallest)
        if hi is not None:
            b = min(b, hi - 1)
        known[b] = probe(cfg.replace(batch_size=b), world_size)["peak_bytes"]
    return {"batch_size": lo, "peak_bytes": known[lo], "next_peak_bytes": known.get(lo + 1), "probes": len(known)}


def report(args, cfg, result: dict, fit: dict | None) -> dict:
    world, images = args.world_size, cfg.batch_size * cfg.grad_accum  # per GPU and optimiser step
    tflops = MATMUL_TFLOPS[args.gpu]
    floor_s = result["step_flops"] / (tflops * 1e12)
    out = {
        "prediction": "fake-tensor prediction on a CPU, not a GPU measurement (bench/estimate.py)",
        "preset": args.preset or "vit_base_dec2", "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "world_size": world,
        "zero_stage": cfg.zero_stage, "impl": cfg.impl, "compiled_blocks": compiled_blocks(cfg),
        "activation_memory_budget": cfg.activation_memory_budget,
        "precision": precision_of(cfg), "config": cfg.to_dict(),
        "peak_gib": result["peak_bytes"] / GIB,
        "breakdown_gib": {k: v / GIB for k, v in result["breakdown"].items()},
        "largest_gib": {c: [(label, size / GIB) for label, size in items] for c, items in result["largest"].items()},
        "reserved_gib": result["reserved_bytes"] / GIB,
        "flops_per_image": result["step_flops"] / images, "step_flops": result["step_flops"],
        "gpu": args.gpu, "matmul_tflops": tflops, "step_time_floor_ms": floor_s * 1e3,
        "img_per_s_ceiling_per_gpu": images / floor_s, "img_per_s_ceiling": world * images / floor_s,
        "seconds": result["seconds"],
    }
    if fit is not None:
        out["max_batch"] = {"gpu_mem_gib": args.gpu_mem, **{k: (v / GIB if k.endswith("bytes") and v else v)
                                                            for k, v in fit.items()}}
    return out


def print_report(r: dict) -> None:
    compiled = f"compiled blocks (activation_memory_budget={r['activation_memory_budget']:g})" \
        if r["compiled_blocks"] else "eager blocks"
    accumulation = f" x {r['grad_accum']} micro-batches" if r["grad_accum"] > 1 else ""
    print(f"{r['preset']}  impl={r['impl']}  batch {r['batch_size']}/GPU{accumulation}  world {r['world_size']}  "
          f"ZeRO {r['zero_stage']}  {r['precision']}  {compiled}")
    print(f"predicted peak GPU memory (max_memory_allocated): {r['peak_gib']:.2f} GiB "
          f"(reserved by the allocator: {r['reserved_gib']:.2f} GiB)")
    for name, gib in r["breakdown_gib"].items():
        print(f"  {name:<12} {gib:8.2f} GiB")
    for category, items in r["largest_gib"].items():
        shown = ", ".join(f"{label} {gib:.2f}" for label, gib in items[:CATEGORIES_SHOWN] if gib >= 0.005)
        print(f"  largest {category} (module/op, GiB): {shown or '-'}")
    fit = r.get("max_batch")
    if fit:
        if fit["batch_size"] is None:
            print(f"largest batch within {fit['gpu_mem_gib']:g} GiB: none ({fit['reason']})")
        else:
            nxt = f", {fit['next_peak_bytes']:.2f} GiB at {fit['batch_size'] + 1}" if fit.get("next_peak_bytes") else ""
            print(f"largest batch within {fit['gpu_mem_gib']:g} GiB: {fit['batch_size']} per GPU "
                  f"({fit['peak_bytes']:.2f} GiB{nxt})")
    print(f"FLOPs per image: {r['flops_per_image'] / 1e9:.1f} GFLOP (step {r['step_flops'] / 1e12:.2f} TFLOP)")
    print(f"step time at the {r['gpu']} bf16 matmul ceiling ({r['matmul_tflops']:g} TFLOP/s): "
          f"{r['step_time_floor_ms']:.1f} ms = {r['img_per_s_ceiling_per_gpu']:,.0f} img/s per GPU, "
          f"{r['img_per_s_ceiling']:,.0f} img/s for {r['world_size']} GPU(s)")
    print(f"(predictions on fake tensors, {r['seconds']:.0f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = measure(cfg, args.world_size)
    fit = None if args.no_max_batch else largest_batch(cfg, args.world_size, args.gpu_mem * GIB, result)
    out = report(args, cfg, result, fit)
    print_report(out)
    if args.out:
        from common import write_json

        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
