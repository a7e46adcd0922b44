"""How many intra-op threads torch gets per rank: the cores this node can give it, after the other ranks
and the data loader's workers have theirs.

torch's default (one thread per core) oversubscribes as soon as the loader's worker processes or other
ranks run beside it; on a loaded CPU every GEMM then waits for its slowest thread (15x slower steps
were measured on 2 cores with one busy). Precedence: cpu_threads > 0, then OMP_NUM_THREADS (set by the
user or by a launcher that binds cores), then the automatic choice.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from moca_fast.peers import RANKS_PER_NODE_VARIABLES

log = logging.getLogger("moca_fast.train")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def intra_op_threads(cores: int, ranks_per_node: int, loader_workers: int) -> int:
    """Threads for one rank: its share of the node's cores minus its loader's workers, at least 1."""
    return max(1, cores // max(1, ranks_per_node) - loader_workers)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def choose_threads(cpu_threads: int, loader_workers: int, env=os.environ, cores: int | None = None) -> ThreadChoice:
    if cpu_threads > 0:
        return ThreadChoice(cpu_threads, "cpu_threads")
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return ThreadChoice(int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS")
    cores = usable_cores() if cores is None else cores
    ranks = next((int(env[v]) for v in RANKS_PER_NODE_VARIABLES if env.get(v, "").isdigit()), 1)
    threads = intra_op_threads(cores, ranks, loader_workers)
    return ThreadChoice(threads, f"auto: {cores} cores / {ranks} ranks on this node - {loader_workers} loader workers")


def set_intra_op_threads(cpu_threads: int, loader_workers: int) -> ThreadChoice:
    """Applies and logs the choice; returns it (recorded in env.json)."""
    choice = choose_threads(cpu_threads, loader_workers)
    torch.set_num_threads(choice.threads)
    log.info("torch intra-op threads per rank: %d (%s; cpu_threads=N overrides)", choice.threads, choice.reason)
    return choice
