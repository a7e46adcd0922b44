"""What a checkpoint costs: write time and bytes per checkpoint, and the time of a resume on another number of ranks.

    python -m bench checkpoints                                # tiny and vit_small_dec2, this tree and main's
    python -m bench checkpoints --presets vit_base_dec2 --against main --batch 1
    python -m bench checkpoints --small                        # CI smoke run: tiny, this tree, 1 write

For each tree (this one, and with --against REV that revision exported by `git archive` into a temporary
folder: the rows side by side, on the same machine in the same run) and each preset, --ranks-before gloo CPU
ranks (fp32, ZeRO --zero-stage, --batch images per rank, random images) take one optimiser step and write
--writes checkpoints with moca_fast.train.checkpoint.save_checkpoint, timed between barriers (the median is
reported; it includes what every checkpoint does: fsync, CRC-32 of every file, pruning to keep_checkpoints).
The bytes of the last one are counted by kind: DeepSpeed's model file, its ZeRO optimiser files (one per rank),
optimizer_full.pt (where the tree writes one) and the rest. Then --ranks-after ranks, built from other weights,
resume from it (load_checkpoint, timed between barriers: the optimiser state re-sliced for the new number of
ranks). The table also gives, by count, the bytes of a checkpoint of --count-preset at --count-ranks ranks in
fp32: module state 4 bytes per value of the module's state dict, optimiser files and optimizer_full.pt 12 bytes
(fp32 master and two Adam moments) per trained parameter, whatever the number of ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("model_file", "optimizer_files", "optimizer_full", "other")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI smoke run: tiny, this tree only, 1 write")
    p.add_argument("--presets", default="tiny,vit_small_dec2", help="comma list of presets (default tiny,vit_small_dec2)")
    p.add_argument("--against", default=None, help="a git revision measured side by side (e.g. main)")
    p.add_argument("--batch", type=int, default=2, help="images per rank of the step before the writes (default 2)")
    p.add_argument("--writes", type=int, default=3, help="checkpoints written per row (default 3)")
    p.add_argument("--ranks-before", type=int, default=2, help="ranks that write (default 2)")
    p.add_argument("--ranks-after", type=int, default=1, help="ranks that resume (default 1)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(1, 2), help="ZeRO stage (default 2)")
    p.add_argument("--count-preset", default="vit_base_dec2", help="preset of the by-count row (default vit_base_dec2)")
    p.add_argument("--count-ranks", type=int, default=8, help="ranks of the by-count row (default 8)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement, as JSON arguments
    args = p.parse_args(argv)
    if args.small:
        args.presets, args.against, args.writes = "tiny", None, 1
    return args


def _settings(preset: str, zero_stage: int, batch: int):
    from moca_fast.config import load_config

    return load_config(preset, overrides=dict(zero_stage=zero_stage, precision="fp32", batch_size=batch,
                                              num_new_words=2, clip_grad=0.0))


def _rank(rank: int, job: dict, world: int, port: int, resume: bool) -> None:
    """One gloo rank: one step and job["writes"] timed checkpoints, or a timed resume from the last one."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from moca_fast.model.moca import MOCA
    from moca_fast.train.checkpoint import load_checkpoint, save_checkpoint
    from moca_fast.train.engine import barrier, build_engine, init_distributed

    dist_info = init_distributed()
    cfg = _settings(job["preset"], job["zero_stage"], job["batch"])
    torch.manual_seed(1 if resume else 0)
    engine, _ = build_engine(MOCA(cfg, world), cfg, dist_info, "fp32")
    output, times = Path(job["output"]), []
    if resume:
        barrier()
        start = time.perf_counter()
        load_checkpoint(engine, Path(job["checkpoint"]), world)
        barrier()
        times.append(time.perf_counter() - start)
    else:
        images = [torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size) for _ in range(2)]
        loss, _ = engine(*images, momentum=0.99, masks=engine.module.sample_masks(2 * cfg.batch_size, "cpu"),
                         update_teacher=True)
        engine.backward(loss)
        engine.step()
        for step in range(1, job["writes"] + 1):
            barrier()
            start = time.perf_counter()
            save_checkpoint(engine, output, step, {"step": step}, {"world_size": world, "config": cfg.to_dict()},
                            keep=cfg.keep_checkpoints)
            barrier()
            times.append(time.perf_counter() - start)
    if rank == 0:
        (output / ("resume.json" if resume else "writes.json")).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def _bytes_by_kind(folder: Path) -> dict[str, int]:
    found = dict.fromkeys(KINDS, 0)
    for path in folder.rglob("*"):
        if path.is_file():
            kind = ("model_file" if path.name.endswith("model_states.pt") else
                    "optimizer_files" if path.name.endswith("optim_states.pt") else
                    "optimizer_full" if path.name == "optimizer_full.pt" else "other")
            found[kind] += path.stat().st_size
    return found


def _measure(job: dict) -> dict:
    """In a worker process whose moca_fast is the tree's: the writes, their bytes, the resume."""
    import torch.multiprocessing as mp

    import moca_fast

    output = Path(job["output"])
    mp.spawn(_rank, args=(job, job["ranks_before"], job["ports"][0], False), nprocs=job["ranks_before"], join=True)
    checkpoint = sorted((output / "checkpoints").glob("step_*"))[-1]
    mp.spawn(_rank, args=({**job, "checkpoint": str(checkpoint)}, job["ranks_after"], job["ports"][1], True),
             nprocs=job["ranks_after"], join=True)
    return {"write_s": statistics.median(json.loads((output / "writes.json").read_text())),
            "bytes": _bytes_by_kind(checkpoint), "resume_s": json.loads((output / "resume.json").read_text())[0],
            "moca_fast": str(Path(moca_fast.__file__).parent)}


def _tree_row(tree: Path, label: str, preset: str, args, scratch: Path) -> dict:
    from moca_fast.distributed import free_port  # not at the top: the worker runs this file on the measured tree

    job = {"preset": preset, "batch": args.batch, "writes": args.writes, "zero_stage": args.zero_stage,
           "ranks_before": args.ranks_before, "ranks_after": args.ranks_after,
           "output": str(scratch / f"{label}-{preset}"), "ports": [free_port(), free_port()]}
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)], cwd=tree,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # the ranks' own lines too (a rank killed by a signal, e.g. SIGABRT, leaves its cause only there)
        return {"tree": label, "preset": preset, "failed": proc.stderr.strip().splitlines()[-30:]}
    row = {"tree": label, "preset": preset, **json.loads(proc.stdout.strip().splitlines()[-1])}
    if not Path(row["moca_fast"]).is_relative_to(tree):  # the installed package shadowed the tree's
        return {"tree": label, "preset": preset, "failed": [f"measured {row['moca_fast']}, not {tree}"]}
    return row


def by_count(preset: str, ranks: int) -> dict:
    """Bytes of a checkpoint of `preset` in fp32 at `ranks` ranks, by count (see the module's docstring)."""
    from moca_fast.config import load_config
    from moca_fast.model.moca import MOCA
    from moca_fast.train.schedules import parameter_groups

    cfg = load_config(preset, overrides=dict(precision="fp32"))
    model = MOCA(cfg, ranks)
    trained = sum(p.numel() for group in parameter_groups(model, model.GENERATOR_PREFIXES) for p in group["params"])
    module = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    return {"tree": "by count", "preset": f"{preset} x{ranks}", "trained_params": trained,
            "bytes": {"model_file": module, "optimizer_files": 12 * trained, "optimizer_full": 12 * trained}}


def _print(rows: list[dict]) -> None:
    mb = lambda n: f"{n / 1e6:,.1f}"  # noqa: E731
    print(f"{'tree':<10} {'preset':<18} {'write s':>8} {'resume s':>9} {'model MB':>9} {'optim MB':>9} "
          f"{'full MB':>8} {'total MB':>9}")
    for r in rows:
        if "failed" in r:
            print(f"{r['tree']:<10} {r['preset']:<18} failed: {r['failed']}")
            continue
        b = r["bytes"]
        timing = (f"{r['write_s']:>8.2f} {r['resume_s']:>9.2f}" if "write_s" in r else f"{'-':>8} {'-':>9}")
        print(f"{r['tree']:<10} {r['preset']:<18} {timing} {mb(b['model_file']):>9} {mb(b['optimizer_files']):>9} "
              f"{mb(b['optimizer_full']):>8} {mb(sum(b.values())):>9}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_measure(json.loads(args.worker))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_checkpoints_") as scratch:
        trees = [(REPO, "this")]
        if args.against:
            exported = Path(scratch) / "against"
            exported.mkdir()
            archive = subprocess.run(["git", "archive", args.against], cwd=REPO, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(exported)], input=archive.stdout, check=True)
            trees.append((exported, args.against))
        for preset in args.presets.split(","):
            rows += [_tree_row(tree, label, preset, args, Path(scratch)) for tree, label in trees]
    if not args.small:
        rows.append(by_count(args.count_preset, args.count_ranks))
    _print(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
