"""Kernel microbenchmarks: the fused loss-path kernels vs PyTorch eager and torch.compile of the reference.

    python -m bench kernels                        # ViT-B/16 sizes, batch 256 per view, bf16 autocast, CUDA
    python -m bench kernels --small --out k.json   # CPU smoke run: tiny sizes, Triton interpreter, fp32

Cases, built from moca_fast.model.losses (impl "reference" vs "fast"), sizes of one MOCA step:
- teacher_assign: the targets of both views (reference: codes, bow and statistic; fused: bow and statistic),
  no gradient;
- image_loss: both masking rounds' image losses, given the targets;
- dense_loss: both rounds' dense losses, given the targets (the fused op recomputes the teacher codes);
- assign+dense: teacher_assign and dense_loss together (the issue's target: fused vs eager and compiled).
Variants: eager (reference), compiled (torch.compile of the reference), fused (the Triton kernels).
Modes: fwd (the forward as in training, autograd recording) and fwd+bwd (then the input gradients).
First a correctness check (fused vs eager on the same inputs; fp32 at a small batch, then the benchmark's own
dtype at full size), then the timings: median over repetitions (CUDA events), peak memory above the inputs.
Beside each timing, its floor: the FLOPs and HBM bytes the case must move at least (its GEMMs, counted once;
reading its inputs and writing its outputs once) and the time those take at the measured ceilings of DESIGN.md §4
(the device's own row: H200 777 TFLOP/s bf16 and 4.18 TB/s; H100 766 and 2.97; on another device the H200's,
so labelled), max(FLOPs / peak, bytes / bandwidth), and the fraction of that floor each variant reaches.
A table is printed last; --out writes everything as JSON.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import time
import traceback

if "--small" in sys.argv[1:]:  # CPU run: the Triton kernels need the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import env_info, first_line, format_table, free_memory, pick_device, sync, write_json  # noqa: E402
from moca_fast.config import load_config  # noqa: E402
from moca_fast.model.codebook import interior_token_ids  # noqa: E402
from moca_fast.model.losses import dense_loss, image_loss, teacher_targets  # noqa: E402
from moca_fast.model.masks import make_two_complementary_masks  # noqa: E402

MIB = 1024**2
# DESIGN.md §4, measured: bf16 matmul TFLOP/s (8192^3) and device copy TB/s
CEILINGS = {"H200": (777.0, 4.18), "H100": (766.0, 2.97)}
VARIANTS = ("eager", "compiled", "fused")
CASES = ("assign+dense", "dense_loss", "teacher_assign", "image_loss")  # the target first (time-boxed runs)
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, decoder_embed_dim=16, num_words=64, skip_offset=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny sizes on the CPU under the Triton interpreter")
    p.add_argument("--batch", type=int, default=None, help="images per view (default 256; 2 with --small)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="bf16: bf16 student features under bf16 autocast (default on CUDA); fp32: exact (CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; 2 with --small)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="time torch.compile(reference) (auto: on CUDA; on the CPU it costs ~1 min per graph)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--out", default=None, help="write the results as JSON here (rewritten after each row)")
    return p.parse_args(argv)


class Inputs:
    """Loss-path inputs of one step: teacher tokens of both views [B, L, C] (fp32, as the teacher's final
    LayerNorm gives them), the codebook, and per round the student [AVG] [2B, C] and decoder rows
    [2B * n_r, D] (in the student dtype) with their positions; the two generators' prototypes (fp32)."""

    def __init__(self, cfg, batch: int, device: torch.device, student_dtype: torch.dtype):
        L, C, K, D = cfg.num_patches, cfg.embed_dim, cfg.num_words, cfg.decoder_embed_dim
        self.tokens = [F.layer_norm(torch.randn(batch, L, C, device=device), (C,)) for _ in range(2)]
        self.words = F.normalize(torch.randn(K, C, device=device).clamp(min=0), dim=1)
        self.inv_temp = torch.tensor([cfg.inv_delta / 0.4], device=device)
        self.interior = interior_token_ids(cfg.grid_size, cfg.skip_offset, device)
        masks = make_two_complementary_masks(2 * batch, L, cfg.len_keep(), cfg.len_dec(), device)
        self.dec_ids = [ids[:, :n] for ids, n in zip(masks, cfg.len_dec())]

        def leaf(*shape, dtype=torch.float32, normalize=False):
            x = torch.randn(*shape, device=device)
            return (F.normalize(x, dim=1) if normalize else x).to(dtype).requires_grad_()

        self.avg = [leaf(2 * batch, C, dtype=student_dtype) for _ in range(2)]
        self.dec = [leaf(ids.numel(), D, dtype=student_dtype) for ids in self.dec_ids]
        self.img_protos = leaf(K, C, normalize=True)
        self.dense_protos = leaf(K, D, normalize=True)
        self.kappa = float(cfg.kappa)

    def rounded(self, dtype: torch.dtype) -> "Inputs":
        """These inputs with the operands that 16-bit products round (teacher tokens, words, prototypes)
        rounded to dtype, differentiably: the function the fused kernels compute under autocast."""
        view = copy.copy(self)
        view.tokens = [t.to(dtype).float() for t in self.tokens]
        view.words, view.img_protos, view.dense_protos = (
            t.to(dtype).float() for t in (self.words, self.img_protos, self.dense_protos))
        return view

    def targets(self, impl: str):
        return teacher_targets(*self.tokens, self.words, self.inv_temp, self.interior, impl)

    def leaves(self, case: str) -> list[torch.Tensor]:
        return self.avg + [self.img_protos] if case == "image_loss" else self.dec + [self.dense_protos]


def case_function(case: str, impl: str, x: Inputs):
    """A function of no arguments returning the case's outputs (a loss first where there is one)."""
    given = None if case in ("teacher_assign", "assign+dense") else x.targets(impl)[0]

    def dense(targets):
        return sum(dense_loss(d, x.dense_protos, x.kappa, targets, ids, impl) for d, ids in zip(x.dec, x.dec_ids))

    def run():
        if case == "teacher_assign":
            targets, stats = x.targets(impl)
            return targets.bow, targets.codes, targets.tokens, *stats
        if case == "image_loss":
            return sum(image_loss(a, x.img_protos, x.kappa, given, impl) for a in x.avg),
        if case == "dense_loss":
            return dense(given),
        targets, stats = x.targets(impl)
        return dense(targets), targets.bow, *stats

    return run


def floors(x: Inputs, student_bytes: int) -> dict:
    """{case: {mode: (FLOPs, HBM bytes)}}: the least work of each case (see the module docstring)."""
    f32 = 4
    (B2, C), K = x.avg[0].shape, x.words.shape[0]
    D = x.dec[0].shape[1]
    tokens = sum(t.numel() for t in x.tokens)  # both views' teacher tokens, elements
    rows = [d.shape[0] for d in x.dec]
    assign = (2.0 * tokens * K, tokens * f32 + K * C * f32 + B2 * K * f32)
    img_gemm = 2.0 * B2 * K * C * len(x.avg)
    img_in = len(x.avg) * (B2 * C * student_bytes + B2 * K * f32) + K * C * f32
    img_grads = len(x.avg) * B2 * C * student_bytes + K * C * f32
    dense_gemm = sum(2.0 * m * K * D for m in rows)
    dense_in = sum(m * D * student_bytes for m in rows) + tokens * f32 + K * (C + D) * f32
    dense_grads = sum(m * D * student_bytes for m in rows) + K * D * f32
    teacher = sum(2.0 * m * K * C for m in rows)  # the dense targets' cosines, once
    out = {"teacher_assign": {"fwd": assign},
           "image_loss": {"fwd": (img_gemm, img_in), "fwd+bwd": (3 * img_gemm, img_in + img_grads)},
           "dense_loss": {"fwd": (dense_gemm + teacher, dense_in),
                          "fwd+bwd": (3 * dense_gemm + teacher, dense_in + dense_grads)}}
    out["assign+dense"] = {mode: (out["dense_loss"][mode][0] + assign[0], out["dense_loss"][mode][1] + assign[1])
                           for mode in ("fwd", "fwd+bwd")}
    return out


def ceilings(env: dict) -> tuple[str, float, float]:
    """(label, TFLOP/s, TB/s) of DESIGN.md §4 for this device."""
    gpu = env.get("gpu") or ""
    family = next((name for name in CEILINGS if name in gpu), None)
    label = f"{family} (DESIGN.md §4)" if family else \
        f"H200 figures of DESIGN.md §4 (not this device: {gpu or 'cpu'})"
    return (label, *CEILINGS[family or "H200"])


def floor_row(row: dict, flops: float, nbytes: float, tflops: float, tbps: float) -> None:
    """Adds the floor (GFLOP, MB, ms at the ceilings) and each variant's fraction of it to a timing row."""
    floor_ms = max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e3
    row["floor"] = {"gflop": flops / 1e9, "hbm_mb": nbytes / 1e6, "ms": floor_ms}
    for variant in VARIANTS:
        if "ms" in row[variant]:
            row[variant]["floor_fraction"] = floor_ms / row[variant]["ms"]


def compile_unavailable(device: torch.device, mode: str) -> str | None:
    """Why torch.compile(reference) is not timed here, or None."""
    if mode == "off":
        return "--compile off"
    if device.type == "cpu":
        if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "c++", "clang++")):
            return "no C++ compiler on this machine (inductor's CPU backend needs one)"
        if mode == "auto":
            return "CPU: inductor's C++ build takes ~1 min per graph on a small CPU (--compile on forces it)"
    return None


def measure(fn, leaves, backward: bool, device: torch.device, reps: int, warmup: int) -> dict:
    """Median ms of fn (+ the gradients of its first output with respect to leaves) and its peak memory."""
    def once():
        out = fn()
        if backward:
            torch.autograd.grad(out[0], leaves)
        return out

    t0 = time.perf_counter()
    for _ in range(warmup):
        once()
    sync(device)
    warmup_s = time.perf_counter() - t0
    free_memory(device)
    peak_extra = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        once()
        sync(device)
        peak_extra = (torch.cuda.max_memory_allocated(device) - base) / MIB
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_all": times, "peak_extra_mib": peak_extra, "warmup_s": warmup_s}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().clamp_min(1e-30)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / scale).item()


def check(x: Inputs, autocast, tol: float | None, cases, reference: Inputs | None = None) -> dict:
    """Fused (under `autocast`) vs the eager reference in fp32 (on `reference`, by default x itself) for each
    case: the relative error of every value and gradient, and the largest; ok when within tol."""
    result = {}
    for case in cases:
        outputs = {}
        for impl, inputs in (("reference", reference or x), ("fast", x)):
            with autocast() if impl == "fast" else torch.autocast(x.words.device.type, enabled=False):
                out = case_function(case, impl, inputs)()
                values = [o for o in out if o is not None and o.dim() <= 2 and o.dtype.is_floating_point]
                grads = list(torch.autograd.grad(out[0], x.leaves(case))) if out[0].requires_grad else []
            outputs[impl] = values + grads
        errors = [rel_err(a, b) for a, b in zip(outputs["fast"], outputs["reference"])]
        result[case] = {"max_rel_err": max(errors), "rel_errs": errors, "tol": tol,
                        "ok": None if tol is None else max(errors) <= tol}
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.small)
    if device.type != "cuda" and not args.small:
        sys.exit("error: no CUDA device: the full benchmark needs a GPU (use --small for the CPU smoke run)")
    cfg = load_config("tiny" if args.small else "vit_base_dec2", overrides=SMALL if args.small else None)
    batch = args.batch or (2 if args.small else 256)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    student_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    reps, warmup = args.reps or (2 if args.small else 20), 1 if args.small else 3

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    report = {"env": env_info(device), "sizes": {"batch_per_view": batch, "tokens": cfg.num_patches,
              "embed_dim": cfg.embed_dim, "words": cfg.num_words, "decoder_dim": cfg.decoder_embed_dim,
              "len_dec": list(cfg.len_dec())}, "dtype": dtype}
    cases = args.cases.split(",")
    for case in cases:
        if case not in CASES:
            sys.exit(f"error: --cases: unknown case {case!r}; choose from {', '.join(CASES)}")
    torch.manual_seed(0)
    start = time.perf_counter()
    if dtype != "fp32":  # the exact path too, at a small batch
        report["check_fp32"] = check(Inputs(cfg, min(batch, 16), device, torch.float32),
                                     lambda: torch.autocast(device.type, enabled=False), 1e-5, cases)
    x = Inputs(cfg, batch, device, student_dtype)
    if dtype == "fp32":
        report["check"] = check(x, autocast, 1e-5, cases)
    else:  # the contract: fp32 math on the operands rounded to bf16; and, for information, the distance to fp32
        report["check"] = check(x, autocast, 1e-2, cases, reference=x.rounded(torch.bfloat16))
        report["deviation_from_fp32"] = check(x, autocast, None, cases)
    print(f"correctness checked in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    skip_compile = compile_unavailable(device, args.compile)
    if skip_compile:
        print(f"torch.compile(reference) not timed: {skip_compile}", file=sys.stderr)
    report["compile_skipped"] = skip_compile

    report["rows"] = []
    label, tflops, tbps = ceilings(report["env"])
    report["ceilings"] = {"source": label, "tflops_bf16": tflops, "tb_per_s": tbps}
    work = floors(x, 2 if dtype == "bf16" else 4)
    for case in cases:
        # one function per variant and case: the compiled one is compiled once, its backward at the first fwd+bwd
        with autocast():
            fns = {v: case_function(case, "fast" if v == "fused" else "reference", x) for v in VARIANTS}
        fns["compiled"] = torch.compile(fns["compiled"])
        for mode in (("fwd",) if case == "teacher_assign" else ("fwd", "fwd+bwd")):
            row = {"case": case, "mode": mode}
            for variant in VARIANTS:
                if variant == "compiled" and skip_compile:
                    row[variant] = {"status": f"skipped: {skip_compile}"}
                    continue
                try:
                    grad_mode = torch.no_grad() if case == "teacher_assign" else torch.enable_grad()
                    with autocast(), grad_mode:
                        row[variant] = {"status": "ok", **measure(fns[variant], x.leaves(case), mode == "fwd+bwd",
                                                                  device, reps, warmup)}
                except Exception as e:  # one failing variant must not hide the others' numbers
                    traceback.print_exc()
                    row[variant] = {"status": f"failed: {first_line(e)}"}
                free_memory(device)
            floor_row(row, *work[case][mode], tflops, tbps)
            report["rows"].append(row)
            print(f"[{time.perf_counter() - start:.0f} s] {case} {mode}: " + ", ".join(
                f"{v} {r['ms']:.3f} ms" if "ms" in r else f"{v} {r['status'].split(':')[0]}" for v, r in
                ((v, row[v]) for v in VARIANTS)), file=sys.stderr)
            write_json(args.out, report)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    def ms(row, variant):
        return row[variant].get("ms")

    table = []
    for row in report["rows"]:
        fused = ms(row, "fused")
        entry = {"case": row["case"], "mode": row["mode"], "gflop": row["floor"]["gflop"],
                 "hbm_mb": row["floor"]["hbm_mb"], "floor_ms": row["floor"]["ms"],
                 "fused_floor": row["fused"].get("floor_fraction")}
        for variant in VARIANTS:
            entry[variant] = ms(row, variant)
            entry[variant + "_mib"] = row[variant].get("peak_extra_mib")
        for base in ("eager", "compiled"):
            entry[base + "/fused"] = ms(row, base) / fused if fused and ms(row, base) else None
        table.append(entry)
    def errors(name):
        return ", ".join(f"{case} {r['max_rel_err']:.1e}{' FAIL' if r['ok'] is False else ''}"
                         for case, r in report[name].items())

    checks = "; ".join(f"{name}: {errors(name)}" for name in ("check_fp32", "check", "deviation_from_fp32")
                       if name in report)
    print(f"{report['env'].get('gpu', report['env']['device'])}, {report['dtype']}, sizes {report['sizes']}")
    print(f"fused vs fp32 eager, max rel err (check_fp32: exact fp32 at batch <= 16; check: the bf16 run vs fp32 "
          f"math on bf16-rounded operands): {checks}")
    print(f"floors: least FLOPs and HBM bytes of each case at {report['ceilings']['source']}: "
          f"{report['ceilings']['tflops_bf16']:g} TFLOP/s, {report['ceilings']['tb_per_s']:g} TB/s; "
          "fused/floor = floor ms / fused ms")
    if report["env"]["device"] == "cpu":
        print("CPU: the fused ops run in the Triton interpreter; these times test the harness, not the kernels")
    print(format_table(table, [("case", "case", ""), ("mode", "mode", ""), ("eager ms", "eager", ".3f"),
                               ("compiled ms", "compiled", ".3f"), ("fused ms", "fused", ".3f"),
                               ("eager/fused", "eager/fused", ".2f"), ("compiled/fused", "compiled/fused", ".2f"),
                               ("eager MiB", "eager_mib", ".0f"), ("compiled MiB", "compiled_mib", ".0f"),
                               ("fused MiB", "fused_mib", ".0f"), ("GFLOP", "gflop", ".1f"),
                               ("HBM MB", "hbm_mb", ".1f"), ("floor ms", "floor_ms", ".3f"),
                               ("fused/floor", "fused_floor", ".2f")]))


if __name__ == "__main__":
    main()
