"""Intra-op threads per rank: sized from the cores the loader's workers and the other ranks leave free,
overridden by cpu_threads or OMP_NUM_THREADS, applied and logged by the trainer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moca_fast.cpu_threads import choose_threads, intra_op_threads, usable_cores

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cores, ranks, workers, expected", [
    (2, 1, 2, 1),   # the demo on 2 cores: its 2 workers take both, torch gets one thread, not 2
    (2, 1, 0, 2),
    (16, 2, 2, 6),
    (96, 8, 10, 2),
    (4, 8, 0, 1),   # more ranks than cores: still one thread
])
def test_threads_are_the_cores_left_to_one_rank(cores, ranks, workers, expected):
    assert intra_op_threads(cores, ranks, workers) == expected


def test_the_setting_wins_then_omp_num_threads_then_the_launchers_ranks_per_node():
    assert choose_threads(3, 2, env={"OMP_NUM_THREADS": "1"}, cores=8).threads == 3
    assert choose_threads(0, 2, env={"OMP_NUM_THREADS": "5"}, cores=8).threads == 5
    assert choose_threads(0, 1, env={"LOCAL_WORLD_SIZE": "2"}, cores=8).threads == 3  # torchrun
    choice = choose_threads(0, 1, env={"LOCAL_SIZE": "4"}, cores=8)  # deepspeed's launch.py
    assert choice.threads == 1 and choice.reason == "auto: 8 cores / 4 ranks on this node - 1 loader workers"


def test_the_run_applies_and_logs_its_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", "--preset", "tiny", "--data-backend", "synthetic",
                           "--output", str(out), "--max-steps", "1"],
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = usable_cores()  # the synthetic backend has no loader workers, tiny no other ranks
    assert f"torch intra-op threads per rank: {cores} (auto: {cores} cores / 1 ranks on this node - 0 loader " \
           f"workers; cpu_threads=N overrides)" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((out / "env.json").read_text())["cpu_threads"]["threads"] == cores
