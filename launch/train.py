"""MOCA pretraining.

  deepspeed launch/train.py                        the demo: a small ViT on MNIST digits, ends with k-NN
  deepspeed launch/train.py --data /imagenet/train --output runs/vitb     the paper's ViT-B/16 recipe
  deepspeed --num_gpus 2 launch/train.py ...       2 ranks (on a CPU-only machine: gloo, fp32)
  deepspeed --hostfile hosts launch/train.py ...   multi-node (checkpoints need a shared filesystem)
  python launch/train.py ...                       one process, no launcher

Settings, later wins: preset (--preset, else the `preset:` key of --config; default vit_base_dec2, or
demo when neither --data nor a preset/config is given) < --config YAML < the flags below < key=value
overrides of any moca_fast.config.Config field (e.g. blr=1e-4 zero_stage=1 precision=fp32).
--deepspeed_config JSON: merged over the generated DeepSpeed config (precedence in moca_fast/train/engine.py).
SIGTERM, SIGINT or SIGHUP (to a rank, the launcher or its process group) stop the run from the first line of
main: in the training loop at the next step, saving it; elsewhere at once (moca_fast/ending.py).
Exit status: 0 done, or stopped in the training loop with the step reached saved; 1 any other error (one line;
the traceback in <output>/error_rankN.log, or a temporary file the line names before the output folder exists);
2 bad setting; 3 non-finite loss/weights/gradient norm; 4 disk full; 128+N stopped by signal N where there was
nothing (more) to save, e.g. before step 1 (129 also when the launcher went away).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from moca_fast.entry import OneLineParser

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of Config fields (may name its base with `preset: NAME`)")
    p.add_argument("--preset", help="vit_base_dec2, vit_large_dec2, vit_small_dec2, tiny or demo")
    p.add_argument("--data", help="image folder: class sub-folders (ImageNet train layout) or flat")
    p.add_argument("--output", help="run folder: config.yaml, env.json, metrics.jsonl, checkpoints/, eval.json")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per GPU (per rank)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (schedules keep --epochs)")
    p.add_argument("--resume", help="auto (the output's latest checkpoint, if any) or a checkpoint/run folder")
    p.add_argument("--data-backend", choices=("auto", "dali", "torch", "synthetic"))
    p.add_argument("--impl", choices=("reference", "fast"))
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON merged over the generated config (see moca_fast/train/engine.py)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace):
    from moca_fast.config import load_config
    from moca_fast.config_parse import parse_kv

    preset = args.preset
    if preset is None and args.config is None and args.data is None:
        preset = "demo"
    flags = {"data": args.data, "output": args.output, "epochs": args.epochs, "batch_size": args.batch_size,
             "max_steps": args.max_steps, "data_backend": args.data_backend, "impl": args.impl}
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_kv(args.overrides))
    cfg = load_config(preset, args.config, overrides)
    if preset == "demo" and args.output is None and args.resume is None and "output" not in overrides:
        cfg = cfg.replace(output=fresh_output(cfg.output))
    return cfg


def fresh_output(path: str) -> str:
    """path, else path_1, path_2, ...: the first run folder without checkpoints (so the demo can be rerun)."""
    from moca_fast.io.checkpoints import CHECKPOINTS

    candidate, n = path, 0
    while (Path(candidate) / CHECKPOINTS).exists():
        n += 1
        candidate = f"{path}_{n}"
    return candidate


def known_error(error: Exception, output: str | None) -> tuple[int, str] | None:
    """(exit status, line) of the errors every rank has alike (moca_fast.train.run_guard's statuses)."""
    from moca_fast.errors import ConfigError
    from moca_fast.io.checkpoints import last_complete
    from moca_fast.train.run_guard import (EXIT_BAD_SETTING, EXIT_DISK_FULL, EXIT_NON_FINITE, DiskFullError,
                                           disk_full, mount_point)
    from moca_fast.train.step import NonFiniteLossError

    if isinstance(error, ConfigError):
        return EXIT_BAD_SETTING, f"error: {error}"
    if isinstance(error, NonFiniteLossError):
        return EXIT_NON_FINITE, f"error: {error}; only checkpoints with finite weights are kept"
    if isinstance(error, DiskFullError):
        return EXIT_DISK_FULL, f"error: {error}"
    where = Path(output or ".")
    if disk_full(error, where):
        written = getattr(error, "filename", None) or where
        return EXIT_DISK_FULL, f"error: no space left on {mount_point(where)} writing {written}; {last_complete(where)}"
    return None


def main(argv: list[str] | None = None) -> int:
    from moca_fast.entry import run_main  # stops are handled and errors are one line from here

    run = {"output": None}

    def train(end) -> int:
        args = parse_args(argv)
        run["output"] = args.output
        cfg = resolve_config(args)
        run["output"] = cfg.output
        from moca_fast.train.loop import Trainer

        trainer = Trainer(cfg, args.resume, args.deepspeed_config)
        result = trainer.train()
        if trainer.dist.is_main:
            if result["skipped_steps"]:
                print(f"note: DeepSpeed skipped {result['skipped_steps']} optimiser step(s) on gradient overflow")
            if result["stopped_by_signal"]:
                print(f"stopped at step {result['step']}; checkpoint saved, continue with --resume auto")
            elif "knn_top1" in result:
                print(f"k-NN top-1 of the teacher (k={result['k']}, {result['val_images']} held-out images): "
                      f"{result['knn_top1']:.2f} % after training, "
                      f"{result['knn_top1_random_init'] or float('nan'):.2f} % at random init  ->  {cfg.output}/eval.json")
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return 0

    def last_complete() -> str:
        from moca_fast.io.checkpoints import last_complete

        return last_complete(run["output"] or ".")

    return run_main(train, known=lambda e: known_error(e, run["output"]), folder=lambda: run["output"],
                    context=last_complete)


if __name__ == "__main__":
    sys.exit(main())
