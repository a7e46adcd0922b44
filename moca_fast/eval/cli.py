"""What the four evaluation commands share: their common flags, start-up, result file, and one-line errors.

Common flags: --checkpoint / --preset (the source, see moca_fast.eval.source), --data / --train / --val,
--output FILE.json, --batch-size, --num-workers, --seed. Started by torchrun / deepspeed (WORLD_SIZE > 1)
each rank takes its share of the images (NCCL on GPUs, gloo on CPUs). A bad setting or input prints one
line `error: ...` naming it and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from moca_fast.config import ConfigError
from moca_fast.distributed import rank_and_world
from moca_fast.entry import EXIT_BAD_INPUT, OneLineParser, first_line, run_main
from moca_fast.eval.data import Splits, load_splits, split_roots
from moca_fast.eval.source import Teacher, load_teacher
from moca_fast.io.official import CheckpointError


def parser(protocol: str, doc: str, prog: str | None = None) -> OneLineParser:
    p = OneLineParser(prog=prog or f"python -m moca_fast.eval {protocol}", description=doc,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="run folder, checkpoint folder, model file, official checkpoint "
                                        "(with --preset) or timm export; absent: --preset at random init")
    p.add_argument("--preset", help="architecture of an official checkpoint, or the randomly initialised preset")
    p.add_argument("--data", help="folder with train/ and val/ class sub-folders, or 'demo'")
    p.add_argument("--train", help="training folder (class sub-folders); overrides --data")
    p.add_argument("--val", help="validation folder (class sub-folders); overrides --data")
    p.add_argument("--output", help=f"result JSON (default eval_{protocol}.json)")
    p.add_argument("--batch-size", type=int, help="images per rank and batch")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0)
    return p


def positive(name: str, value, minimum=1):
    if value is not None and value < minimum:
        raise ConfigError(f"{name} {value} must be >= {minimum}")
    return value


class Session:
    """Process group, device, the teacher and the data of one evaluation command."""

    def __init__(self, args: argparse.Namespace, default_batch: int):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world_size = rank_and_world()
        self.batch_size = positive("--batch-size", args.batch_size) or default_batch
        self.teacher: Teacher = load_teacher(args.checkpoint, args.preset, self.device)
        cfg = self.teacher.cfg.replace(batch_size=self.batch_size)
        if args.num_workers is not None:
            cfg = cfg.replace(num_workers=positive("--num-workers", args.num_workers, 0))
        self.cfg = cfg
        self.splits: Splits = load_splits(*split_roots(args.data, args.train, args.val, cfg), cfg)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run(protocol: str, main, argv: list[str] | None) -> int:
    """Parses nothing itself: calls main(argv) -> (output, result dict, summary line) and reports it. Stops and
    errors end as one line (moca_fast.entry): a bad setting or input with status 2."""
    return run_main(lambda end: _run(protocol, main, argv, end), known=_known_error)


def _known_error(error: Exception) -> tuple[int, str] | None:
    if isinstance(error, (ConfigError, CheckpointError)):
        return EXIT_BAD_INPUT, f"error: {first_line(error)}"
    return None


def _run(protocol: str, main, argv: list[str] | None, end) -> int:
    end.immediate("before the evaluation finished: no result is written (fine-tuning keeps the epochs it saved)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    had_group = dist.is_initialized()
    try:
        output, result, summary = main(argv)
    finally:
        if dist.is_initialized() and not had_group:  # only the group this command started (Session)
            dist.destroy_process_group()
    if output is not None:
        path = Path(output or f"eval_{protocol}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"protocol": protocol, **result}, indent=1))
        os.replace(tmp, path)
        print(f"{summary}  ->  {path}")
    return 0


def output_of(args: argparse.Namespace, session: Session) -> str | None:
    """The result file path on rank 0 ("" = the default name), None on the other ranks."""
    return (args.output or "") if session.is_main else None
