"""The two ends of bench/device_check.sh: what this machine offers, and the summary of the whole check.

    python3 -P bench/device_report.py env --out OUT/env.json     # torch, GPU, the package, each optional piece
    python3 -P bench/device_report.py summary OUT                 # OUT/{env,kernels,throughput}.json -> table

Run with -P (and from anywhere): the repository root must not come first on sys.path, or its moca_fast
would shadow the copy bench/device_check.sh assembles. The environment report prints where moca_fast and
moca_fast.kernels were imported from, so a shadowed copy shows.
Each optional piece is "ok <version>", "missing: <why>" (not installed, or nothing here to run it on) or
"failed: <why>" (installed but does not work here).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _import(name: str):
    """(module, None) or (None, "missing: ..." / "failed: ...")."""
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        return None, f"missing: {first_line(e)}"
    except Exception as e:  # installed but broken: wrong torch ABI, missing shared library, ...
        return None, f"failed: import: {first_line(e)}"


def _version(module) -> str:
    return f"ok {getattr(module, '__version__', '')}".rstrip()


def probe_deepspeed(cuda: bool) -> str:
    module, why = _import("deepspeed")
    return why or f"{_version(module)} ({Path(module.__file__).parent.parent})"


def probe_xformers(cuda: bool) -> str:
    from moca_fast.model.attention import probe_xformers as probe

    module, why = _import("xformers")
    if why:
        return why
    if not cuda:
        return f"missing: no CUDA device ({_version(module)} imports)"
    reason = probe("cuda")
    return f"failed: {reason}" if reason else _version(module)


def probe_dali(cuda: bool) -> str:
    module, why = _import("nvidia.dali")
    if why:
        return why
    _, why = _import("moca_fast.data.dali")
    if why:
        return why
    if not cuda:
        return f"missing: no CUDA device ({_version(module)} imports)"
    try:
        import numpy as np
        from nvidia.dali import fn, pipeline_def

        jpeg = np.frombuffer(_tiny_jpeg(), dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=0)
        def decode():
            return fn.decoders.image(fn.external_source(source=lambda: [jpeg], batch=True), device="mixed")

        pipe = decode()
        pipe.build()
        shape = tuple(pipe.run()[0].as_cpu().at(0).shape)
    except Exception as e:
        return f"failed: mixed (nvJPEG) decode: {first_line(e)}"
    return _version(module) if shape == (16, 16, 3) else f"failed: decoded shape {shape}, not (16, 16, 3)"


def probe_apex(cuda: bool) -> str:
    module, why = _import("apex")
    if why:
        return why
    _, why = _import("apex.optimizers")
    return f"failed: not NVIDIA apex (no apex.optimizers: {why})" if why else _version(module)


def probe_nvjpeg(cuda: bool) -> str:
    module, why = _import("torchvision")
    if why:
        return why
    if not cuda:
        return f"missing: no CUDA device (torchvision {module.__version__} imports)"
    try:
        import torch
        from torchvision.io import decode_jpeg

        image = decode_jpeg(torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8), device="cuda")
    except Exception as e:
        return f"failed: torchvision.io.decode_jpeg on cuda: {first_line(e)}"
    return f"ok torchvision {module.__version__}" if tuple(image.shape) == (3, 16, 16) else \
        f"failed: decoded shape {tuple(image.shape)}"


def probe_triton(cuda: bool) -> str:
    module, why = _import("triton")
    if why:
        return why
    if not cuda:
        return _version(module) + " (no CUDA device: the kernels run in its interpreter)"
    try:
        target = module.runtime.driver.active.get_current_target()
    except Exception as e:
        return f"failed: no active driver: {first_line(e)}"
    return f"{_version(module)} ({target.backend} {target.arch})"


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


PIECES = {"deepspeed": probe_deepspeed, "xformers": probe_xformers, "dali": probe_dali, "apex": probe_apex,
          "nvjpeg (torchvision)": probe_nvjpeg, "triton": probe_triton}


def environment() -> dict:
    import torch

    import moca_fast
    import moca_fast.kernels

    cuda = torch.cuda.is_available()
    report = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "moca_fast": moca_fast.__file__, "moca_fast.kernels": moca_fast.kernels.__file__, "pieces": {}}
    for name, probe in PIECES.items():
        try:
            report["pieces"][name] = probe(cuda)
        except Exception as e:  # a probe must not end the report
            report["pieces"][name] = f"failed: probe raised {first_line(e)}"
    return report


def print_environment(report: dict) -> None:
    print(f"python {report['python']}, torch {report['torch']} (CUDA {report['cuda']}), "
          f"GPU: {report['gpu'] or 'none (CPU dry run)'}")
    print(f"moca_fast: {report['moca_fast']}\nmoca_fast.kernels: {report['moca_fast.kernels']}")
    for name, status in report["pieces"].items():
        print(f"  {name:<21} {status}")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary_rows(out: Path) -> list[tuple[str, str]]:
    """(stage, one-line result) in the report's order, from the JSON the stages left in `out`."""
    rows = []
    env = _load(out / "env.json")
    if env is None:
        rows.append(("environment", "no env.json"))
    else:
        states = [s.split(":")[0].split()[0] for s in env["pieces"].values()]
        rows.append(("environment", f"{env['gpu'] or 'CPU'}; optional pieces: " + ", ".join(
            f"{n} {s}" for n, s in zip(env["pieces"], states))))
    kernels = _load(out / "kernels.json")
    if kernels is None:
        rows += [("fused vs reference", "no kernels.json"), ("kernel timings", "no kernels.json")]
    else:
        for key in ("check_fp32", "check"):
            if isinstance(kernels.get(key), dict):
                rows.append((f"fused vs reference ({key})",
                             ", ".join(f"{case} {_check(v)}" for case, v in kernels[key].items())))
        timed = kernels.get("rows") or []
        done = sum(1 for r in timed if isinstance(r, dict) and (r.get("fused") or {}).get("status") == "ok")
        rows.append(("kernel timings", f"{done} of {len(timed)} rows timed (fused ok); table above"))
    throughput = _load(out / "throughput.json")
    if throughput is None:
        rows.append(("training step", "no throughput.json"))
    else:
        for name, r in throughput.get("variants", {}).items():
            if r.get("status") == "ok":
                text = (f"{r['img_per_s']:.1f} img/s, MFU {100 * r['mfu']:.1f} %, "
                        f"peak {r['peak_mem_gib']:.2f} GiB")
                if r.get("host_syncs_per_step") is not None:
                    text += f", {r['host_syncs_per_step']} host syncs/step"
                if r.get("deepspeed_defaults_slowdown") is not None:
                    text += f"; DeepSpeed's defaults: x{r['deepspeed_defaults_slowdown']:.3f} step time"
                    if r["with_deepspeed_defaults"].get("host_syncs_per_step") is not None:
                        text += f", {r['with_deepspeed_defaults']['host_syncs_per_step']} syncs/step"
            else:
                text = r.get("status", "?")
            rows.append((f"step {name}", text))
    return rows


def stage_times(out: Path) -> str:
    """bench/device_check.sh's stages.tsv (name, exit status, seconds, limit) as one line."""
    try:
        lines = (out / "stages.tsv").read_text().splitlines()
    except OSError:
        return "no stages.tsv"
    return ", ".join(f"{name} {status} ({seconds} s / {limit})" for name, status, seconds, limit in
                     (line.split("\t") for line in lines if line.count("\t") == 3))


def _check(result) -> str:
    """One case of bench/kernels.py's check: max relative error against its tolerance, ok or FAIL."""
    if isinstance(result, dict) and isinstance(result.get("max_rel_err"), (int, float)):
        verdict = "ok" if result.get("ok") else "FAIL"
        return f"{result['max_rel_err']:.1e} (tol {result.get('tol')}) {verdict}"
    return str(result)[:60]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="the environment report")
    env.add_argument("--out", default=None, help="write it as JSON here")
    summary = sub.add_parser("summary", help="one table of every stage's result")
    summary.add_argument("out", help="the folder the stages wrote their JSON to")
    args = p.parse_args(argv)
    if args.command == "env":
        report = environment()
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        print_environment(report)
    else:
        rows = summary_rows(Path(args.out))
        width = max(len(stage) for stage, _ in rows)
        print("\n== summary")
        print("stages (exit status, seconds / limit; 124: over its limit): " + stage_times(Path(args.out)))
        for stage, text in rows:
            print(f"{stage:<{width}}  {text}")


if __name__ == "__main__":
    main()
