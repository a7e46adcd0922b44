"""What the four evaluation commands share: their common flags, start-up, result file, and one-line errors.

Common flags: --checkpoint / --preset (the source, see moca_fast.io.teacher), --data / --train / --val,
--output FILE.json, --batch-size, --num-workers, --seed. Started by torchrun / deepspeed (WORLD_SIZE > 1)
each rank takes its share of the images (NCCL on GPUs, gloo on CPUs). A bad setting or input prints one
line `error: ...` naming it and exits with status 2; the outputs are checked (a probe write) before any work.
The result file is written atomically; one that cannot be written at the end after all is kept in the
temporary folder (or printed), named by the error line, with exit status 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from moca_fast.cpu_threads import set_intra_op_threads
from moca_fast.distributed import on_rank0, rank_and_world
from moca_fast.entry import EXIT_ERROR, OneLineParser, known_error, positive, run_main
from moca_fast.eval.data import Splits, load_splits, split_roots
from moca_fast.io.teacher import Teacher, load_teacher
from moca_fast.output_files import atomic_file, check_output_file, check_output_folder


def parser(protocol: str, doc: str, prog: str | None = None, data_help: str | None = None) -> OneLineParser:
    """The common flags; data_help (a command whose data are not class folders): --data's help, and no
    --train / --val."""
    p = OneLineParser(prog=prog or f"python -m moca_fast.eval {protocol}", description=doc,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="run folder, checkpoint folder, model file, official checkpoint "
                                        "(with --preset) or timm export; absent: --preset at random init")
    p.add_argument("--preset", help="architecture of an official checkpoint, or the randomly initialised preset")
    p.add_argument("--data", help=data_help or "folder with train/ and val/ class sub-folders, or 'demo'")
    if data_help is None:
        p.add_argument("--train", help="training folder (class sub-folders); overrides --data")
        p.add_argument("--val", help="validation folder (class sub-folders); overrides --data")
    p.add_argument("--output", default=f"eval_{protocol}.json", help="result JSON (checked for writability first)")
    p.add_argument("--batch-size", type=int, help="images per rank and batch")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0)
    return p


def _check_outputs(output: str, folders: dict[str, str]) -> None:
    check_output_file(output, "--output")
    for flag, folder in folders.items():
        check_output_folder(folder, f"{flag} {folder}")


class Session:
    """Process group, device, the teacher and the data of one evaluation command."""

    def __init__(self, args: argparse.Namespace, default_batch: int, output_folders: dict[str, str] | None = None,
                 class_folders: bool = True):
        """output_folders: {flag: folder} the command will write in, checked with --output before any work.
        class_folders: read --data / --train / --val as class folders (self.splits); else the command reads
        its data itself."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world_size = rank_and_world()
        on_rank0(lambda: _check_outputs(args.output, output_folders or {}))
        self.batch_size = positive("--batch-size", args.batch_size) or default_batch
        self.teacher: Teacher = load_teacher(args.checkpoint, args.preset, self.device)
        cfg = self.teacher.cfg.replace(batch_size=self.batch_size)
        if args.num_workers is not None:
            cfg = cfg.replace(num_workers=positive("--num-workers", args.num_workers, 0))
        self.cfg = cfg
        self.threads = set_intra_op_threads(cfg.cpu_threads, cfg.num_workers) if self.device.type == "cpu" else None
        if class_folders:
            self.splits: Splits = load_splits(*split_roots(args.data, args.train, args.val, cfg), cfg)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run(protocol: str, main, argv: list[str] | None) -> int:
    """Parses nothing itself: calls main(argv) -> (output, result dict, summary line) and reports it. Stops and
    errors end as one line (moca_fast.entry): a bad setting or input with status 2."""
    return run_main(lambda end: _run(protocol, main, argv, end), known=known_error)


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
        return _write_result(Path(output), json.dumps({"protocol": protocol, **result}, indent=1), summary)
    return 0


def _write_result(path: Path, text: str, summary: str) -> int:
    """The result file, atomically; if it cannot be written after all (the disk filled up meanwhile), the
    result goes to a file in the temporary folder, or to stdout, and the error line says where."""
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        print(summary)
        try:
            handle, kept = tempfile.mkstemp(prefix=f"{path.stem}_", suffix=".json")
            with os.fdopen(handle, "w") as f:
                f.write(text)
        except OSError:
            print(text)
            kept = "printed above"
        print(f"error: {path} could not be written ({e.strerror or e}); the result is in {kept}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{summary}  ->  {path}")
    return 0


def output_of(args: argparse.Namespace, session: Session) -> str | None:
    """The result file path on rank 0, None on the other ranks."""
    return args.output if session.is_main else None
