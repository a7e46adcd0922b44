"""The benchmarks' one front door, run from the repository root:

    python -m bench                      # what each sub-command measures (also: --help)
    python -m bench NAME [flags]         # run one: NAME --help for its flags; --small is its CPU smoke run

Each sub-command is one file of bench/, run as that file is run by path (`python bench/FILE ...`, the
device check with bash), so its flags, tables and JSON are the file's own. The other files of bench/ are
shared by them: common.py (device, timing, memory, tables, JSON), steps.py (the training steps timed),
flops.py (FLOPs of a step), device_report.py (the device check's environment report and summary).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

#: sub-command -> (its file in bench/, the question it answers)
COMMANDS = {
    "estimate": ("estimate.py", "Before renting a GPU: predicted peak memory, largest batch that fits, FLOPs, "
                                "step-time floor (CPU, seconds)"),
    "compile": ("compile.py", "Does every fast-path Triton kernel compile for sm_90a: registers, spills, shared "
                              "memory, wgmma? (no GPU needed)"),
    "kernels": ("kernels.py", "Fused loss kernels vs eager and torch.compile: right answers, time, memory, "
                              "floors"),
    "throughput": ("throughput.py", "Training step end to end: img/s, MFU, peak memory, host syncs; reference "
                                    "vs fast vs the trainer's step"),
    "profile": ("step_profile.py", "Where the step's time goes: GEMM, attention, losses, optimiser, data wait, "
                                   "...; Chrome traces"),
    "data": ("data.py", "Loader only: image pairs per second out of each data backend, no model"),
    "checkpoints": ("checkpoints.py", "What a checkpoint costs: write time and bytes per checkpoint, resume time "
                                      "on another number of ranks (CPU, gloo; --against main side by side)"),
    "scale": ("scale.py", "At ImageNet scale: scan speed, time to first step, worker memory, loader cost "
                          "(extrapolated)"),
    "device-check": ("device_check.sh", "The prepared run on a lent GPU: environment, training step, kernels, "
                                        "input pipeline (--small: CPU dry run; --wheels: collect deepspeed's "
                                        "wheels first)"),
    "dali-parts": ("dali_parts.sh", "DALI's wheels to the lent GPU in parts: pack here, check each part per run, "
                                    "join on the last"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.strip(), "", "sub-commands:"]
    lines += [f"  {name:<{width}}  {question}" for name, (_, question) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m bench: unknown sub-command '{name}' (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    script = BENCH / COMMANDS[name][0]
    # exec, not import: each file sets what must precede its imports (TRITON_INTERPRET for --small, sys.path)
    if script.suffix == ".sh":
        os.execvp("bash", ["bash", str(script), *args])
    os.execv(sys.executable, [sys.executable, str(script), *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
