"""Ahead-of-time compile check of every Triton kernel the fast path launches, for sm_90a, on any machine.

    python -m bench compile [--json FILE] [--batch 256] [--preset vit_base_dec2]

The ops run on meta tensors at the trainer's shapes (ViT-B/16, batch 256 per view by default: the teacher
assignment of both views, both masking rounds' image and dense losses, forward with gradients) in bf16 and fp32,
with moca_fast.kernels.recording() collecting the launches they would make. Each distinct launch (every config
of an autotuned kernel) is specialised through the JIT's own argument binder, as a real launch would be, and
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)). The wheel's own
`ptxas -v --gpu-name=sm_90a` gives registers and spills, the metadata shared memory, and `cuobjdump -sass`
tells wgmma (HGMMA) from mma.sync (HMMA). Compile-time figures, not speeds.

Writes a JSON list (one object per kernel and configuration: kernel, cases, dtypes, ok, error, regs,
spill_bytes, shared_bytes, num_warps, num_stages, dots, wgmma) and prints a table. `problems(results)` names
what the CI test rejects: a compile failure, a spill in a bf16 kernel, shared memory over sm_90's 227 KiB, a
bf16 kernel with dots that does not use wgmma.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import Autotuner
from triton.runtime.jit import create_function_from_signature

from moca_fast.config import load_config
from moca_fast.kernels import codebook_assign, recording, soft_ce
from moca_fast.model.codebook import interior_token_ids

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_LIMIT = 227 * 1024
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def trainer_launches(preset: str, batch: int, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """(case, launch) for the launches of one training step's fused ops at the preset's shapes, as the trainer
    calls them in `dtype` (student features, generator prototypes and teacher tokens in it; words fp32)."""
    cfg = load_config(preset)
    L, C, K, D = cfg.num_patches, cfg.embed_dim, cfg.num_words, cfg.decoder_embed_dim
    meta = dict(device="meta")
    tokens = torch.empty(2 * batch, L + 1, C, dtype=dtype, **meta)[:, 1:]  # [CLS] dropped: a strided view
    words = torch.empty(K, C, **meta)
    inv_temp = torch.empty(1, **meta)
    interior = interior_token_ids(cfg.grid_size, cfg.skip_offset, torch.device("cpu")).to("meta")
    ids_shuffle = torch.empty(2 * batch, L, dtype=torch.int64, **meta)
    out = []

    def record(case, fn, *args):
        with recording() as launches:
            fn(*args)
        out.extend((case, launch) for launch in launches)

    state = torch.empty(4, batch * L, **meta)
    record("assign", codebook_assign.launch_assign, tokens[:batch], words, inv_temp, interior, dtype, *state[:3],
           torch.empty(batch, K, **meta))
    img_protos, dense_protos = torch.empty(K, C, dtype=dtype, **meta), torch.empty(K, D, dtype=dtype, **meta)
    for round_, n in enumerate(cfg.len_dec(), 1):
        record(f"image_loss r{round_}", soft_ce.kl_forward, torch.empty(2 * batch, C, dtype=dtype, **meta),
               img_protos, cfg.kappa, torch.empty(2 * batch, K, **meta), None, None, None, None, dtype,
               torch.float32, True)
        record(f"dense_loss r{round_}", soft_ce.kl_forward, torch.empty(2 * batch * n, D, dtype=dtype, **meta),
               dense_protos, cfg.kappa, None, tokens, ids_shuffle[:, :n], words, inv_temp, dtype, dtype, True)
    return out


class _Pointer:
    """What the binder reads of a tensor argument: its dtype and its address (a CUDA allocation is 512-byte
    aligned; a view adds its storage offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 512 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


def specialise(kernel, args, kwargs):
    """(jit fn, ASTSource, options) of one launch, through the JIT's own binder; one per autotune config."""
    backend = make_backend(TARGET)
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    out = []
    for config in configs:
        kw = dict(kwargs)
        if config is not None:
            kw.update({k: v for k, v in config.all_kwargs().items() if v is not None})
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
        out.append((fn, ASTSource(fn, signature, constexprs, attrs), options))
    return out


def _quiet(call):
    """call() with the process's stderr (MLIR's reproducer dumps) captured; returns (result or exception, text)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            result = call()
        except Exception as e:  # a compile failure is a result here
            result = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return result, log.read()


def _tool(name: str, *args: str) -> str:
    done = subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True)
    return done.stdout + done.stderr


def measure(src: ASTSource, options) -> dict:
    """Compile for sm_90a and read the binary: ok, error, regs, spill_bytes, shared_bytes, warps, stages, wgmma."""
    compiled, text = _quiet(lambda: triton.compile(src, target=TARGET, options=options.__dict__))
    if isinstance(compiled, Exception):
        reason = [line for line in text.splitlines() if "Assertion" in line or "error:" in line]
        reason = reason[0].split("runOnOperation(): ")[-1].strip() if reason else str(compiled).splitlines()[0]
        return {"ok": False, "error": reason[:300]}
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        info = _tool("ptxas", "-v", "--gpu-name=sm_90a", "-o", os.devnull, ptx)
        sass = _tool("cuobjdump", "-sass", cubin)
    regs = re.search(r"Used (\d+) registers", info)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    meta = compiled.metadata
    return {"ok": True, "error": None, "regs": int(regs.group(1)) if regs else None, "spill_bytes": max(spills or [0]),
            "shared_bytes": meta.shared, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
            "dots": "tt.dot" in compiled.asm["ttir"], "wgmma": "HGMMA" in sass, "mma_sync": "HMMA" in sass}


def compile_all(preset: str = "vit_base_dec2", batch: int = 256, dtypes=tuple(DTYPES)) -> list[dict]:
    """One result per distinct (kernel, specialisation, config), with the cases and dtypes that launch it."""
    results: dict[str, dict] = {}
    for dtype in dtypes:
        for case, (kernel, _grid, args, kwargs) in trainer_launches(preset, batch, DTYPES[dtype]):
            for fn, src, options in specialise(kernel, args, kwargs):
                key = f"{fn.__name__}|{src.hash()}|{options.hash()}"
                if key not in results:
                    start = time.perf_counter()
                    variant = ",".join(f"{fn.arg_names[path[0]]}={v}" for path, v in src.constants.items()
                                       if fn.arg_names[path[0]].isupper() and isinstance(v, (bool, int)))
                    results[key] = {"kernel": fn.__name__, "variant": variant, "cases": [], "dtypes": [],
                                    **measure(src, options), "compile_s": None}
                    results[key]["compile_s"] = round(time.perf_counter() - start, 2)
                entry = results[key]
                for field, value in (("cases", case), ("dtypes", dtype)):
                    if value not in entry[field]:
                        entry[field].append(value)
    return list(results.values())


def problems(results: list[dict]) -> list[str]:
    """What the CI check rejects, one line each."""
    out = []
    for r in results:
        name = f"{r['kernel']} [{r['variant']}] ({'/'.join(r['dtypes'])}; {', '.join(r['cases'])})"
        bf16 = "bf16" in r["dtypes"]
        if not r["ok"]:
            out.append(f"{name}: does not compile for sm_90a: {r['error']}")
            continue
        if bf16 and r["spill_bytes"]:
            out.append(f"{name}: spills {r['spill_bytes']} bytes ({r['regs']} registers)")
        if r["shared_bytes"] > SM90_SHARED_LIMIT:
            out.append(f"{name}: {r['shared_bytes']} bytes of shared memory > sm_90's {SM90_SHARED_LIMIT}")
        if bf16 and r["dots"] and not r["wgmma"]:
            out.append(f"{name}: bf16 dots without wgmma (mma.sync)")
    return out


def table(results: list[dict]) -> str:
    head = f"{'kernel':22} {'variant':42} {'dtypes':10} {'ok':3} {'regs':>4} {'spill':>5} {'smem':>7} " \
           f"{'warps':>5} {'stages':>6} {'dots':>4} {'wgmma':>5}  cases / error"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = [f"{r['kernel']:22}", f"{r['variant'][:42]:42}", f"{'/'.join(r['dtypes']):10}",
                 f"{'yes' if r['ok'] else 'NO':3}"]
        if r["ok"]:
            cells += [f"{r['regs']:>4}", f"{r['spill_bytes']:>5}", f"{r['shared_bytes']:>7}", f"{r['num_warps']:>5}",
                      f"{r['num_stages']:>6}", f"{'yes' if r['dots'] else 'no':>4}",
                      f"{'yes' if r['wgmma'] else 'no':>5}", " " + ", ".join(r["cases"])]
        else:
            cells += [" " * 41, " " + r["error"]]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here (a JSON list)")
    p.add_argument("--preset", default="vit_base_dec2", help="model preset whose shapes are compiled")
    p.add_argument("--batch", type=int, default=256, help="images per view (default 256)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("error: bench/compile.py compiles for the GPU: unset TRITON_INTERPRET")
    start = time.perf_counter()
    results = compile_all(args.preset, args.batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"triton {triton.__version__}, target sm_90a, {args.preset} batch {args.batch}, "
          f"{time.perf_counter() - start:.0f} s (compile-time figures, not speeds)")
    print(table(results))
    found = problems(results)
    for line in found:
        print("PROBLEM:", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
