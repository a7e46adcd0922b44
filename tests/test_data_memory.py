"""Loader workers at ImageNet scale: flat memory over epochs (no copy-on-write of the file list), and
workers that end with their process however it ends."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch

from moca_fast.config import load_config
from moca_fast.data import torch_backend
from moca_fast.data.image_list import synthetic_image_list

REPO = Path(__file__).resolve().parents[1]
NUM_PATHS = 1_050_000
BATCH = 8192
EPOCHS = 2
MAX_GROWTH_MB = 16  # measured: +1 to +6 MB; the path strings of a Python list: +84 MB at this size, copied page by
# page, and the parent's objects written by its garbage collector unless frozen before the fork: +87 MB


class _ConstantViews:
    """Stands in for the PIL decode and augmentation (not under test: this test measures the memory the
    worker's reads of the file list cost); returns the same two tiny views for every image."""

    def __init__(self, *args):
        self.views = torch.zeros(3, 1, 1, dtype=torch.uint8), torch.zeros(3, 1, 1, dtype=torch.uint8)

    def __call__(self, image, rng):
        return self.views


def worker_uss_mb(loader) -> float:
    worker, = loader._loader._iterator._workers
    return psutil.Process(worker.pid).memory_full_info().uss / 2**20


def test_worker_memory_stays_flat_over_epochs_at_a_million_paths(monkeypatch):
    monkeypatch.setattr(torch_backend, "open_rgb", len)  # the path is read; no file is opened
    monkeypatch.setattr(torch_backend, "TwoViewTransform", _ConstantViews)
    monkeypatch.setattr(torch_backend, "sample_rng", lambda *key: None)  # seeds the augmentation: not used here
    cfg = load_config("tiny", overrides=dict(batch_size=BATCH, num_workers=1, seed=0))
    loader = torch_backend.TorchTwoViewLoader(synthetic_image_list(NUM_PATHS), cfg, 0, 1, "cpu")
    assert len(loader) == NUM_PATHS // BATCH
    uss = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for step, (x1, _) in enumerate(loader):
            if epoch == 0 and step == 0:
                uss.append(worker_uss_mb(loader))
        assert step == len(loader) - 1 and x1.shape == (BATCH, 3, 1, 1)
        gc.collect()  # as the trainer's own collections do: without the loader's gc.freeze, +87 MB here
        uss.append(worker_uss_mb(loader))
    growth = max(uss) - uss[0]
    assert growth <= MAX_GROWTH_MB, f"worker USS grew by {growth:.0f} MB over {EPOCHS} epochs (MB: {uss})"


HOLDER = textwrap.dedent("""
    import os, sys, time
    from moca_fast.config import load_config
    from moca_fast.data import build_eval_loader, build_train_loader
    cfg = load_config("tiny", overrides=dict(data=sys.argv[1], data_backend="torch", img_size=16, batch_size=2,
                                            num_workers=2))
    train = build_train_loader(cfg)
    next(iter(train))  # persistent workers, mid-epoch
    evaluation = iter(build_eval_loader(sys.argv[1], cfg))
    next(evaluation)  # a second loader's workers, mid-pass
    print(os.getpid(), flush=True)
    how = sys.argv[2]
    if how == "wait":
        time.sleep(600)
    elif how == "raise":
        raise RuntimeError("the script fails while holding loaders")
""")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from jpeg_folder import write_class_folders

    return write_class_folders(tmp_path_factory.mktemp("hold"), 6)


@pytest.mark.parametrize("ending", ["return", "raise", "SIGKILL"])
def test_loader_workers_end_with_their_process_however_it_ends(folder, ending):
    how = "wait" if ending.startswith("SIG") else ending
    script = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), how], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pid = int(script.stdout.readline() or 0)
        assert pid == script.pid, script.stderr.read()[-2000:]
        workers = psutil.Process(pid).children()
        assert len(workers) == 4
        if ending.startswith("SIG"):
            os.kill(pid, getattr(signal, ending))
        returncode = script.wait(timeout=60)  # today: a script that returns hangs at exit
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == [], f"loader workers outlived the script ({ending})"
    finally:
        script.kill()
        script.wait()
    expected = {"return": 0, "raise": 1, "SIGTERM": -signal.SIGTERM, "SIGKILL": -signal.SIGKILL}[ending]
    assert returncode == expected, script.stderr.read()[-2000:]
