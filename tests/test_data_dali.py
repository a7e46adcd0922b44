"""The DALI backend on its CPU pipeline (device_id=None): input kinds, bad inputs, determinism, resume,
sharding inside a real `deepspeed --num_gpus 2` run, the GPU graph's construction, and the data
benchmark's smoke mode.

Run as a script (python tests/test_data_dali.py --data DIR --out DIR) it is the per-rank worker of
test_two_ranks_read_disjoint_shards_covering_each_epoch, started by the deepspeed launcher.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moca_fast.config import load_config
from moca_fast.data import build_train_loader, scan_on_rank0
from moca_fast.data import dali as D
from moca_fast.data import transforms as T
from moca_fast.data.scan import open_rgb, scan_images
from moca_fast.data.sharding import EpochShard
from moca_fast.errors import ConfigError
from jpeg_folder import assert_same_batches, collect

REPO = Path(__file__).resolve().parents[1]
NO_AUGMENT = T.ViewRecipe(blur_p=0.0, solarize_p=0.0, jitter_p=0.0, grayscale_p=0.0, flip_p=0.0)
IMG_SIZE = 32


def config(folder, **overrides):
    base = dict(data=str(folder), data_backend="dali", img_size=IMG_SIZE, batch_size=4, num_workers=2, seed=3)
    return load_config("tiny", overrides={**base, **overrides})


def pixels(view: torch.Tensor) -> np.ndarray:
    """Normalised [3, S, S] -> [S, S, 3] in grey levels 0..255."""
    std, mean = np.array(T.IMAGENET_STD), np.array(T.IMAGENET_MEAN)
    return (view.permute(1, 2, 0).numpy() * std + mean) * 255


def noise_image(size, mode="RGB", seed=0):
    """A smooth random colour field with noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    rgb = np.clip(np.asarray(low, np.float64) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def write_kinds(root):
    """Class a: every decodable kind (square, so a full-area crop is the whole image); class b: the
    undecodable kinds; class c: empty. Returns (usable paths, bad paths)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "c").mkdir()
    img = noise_image((40, 40))
    deep = (np.asarray(img.convert("L"), np.uint16) * 257 + np.arange(40, dtype=np.uint16)).astype(np.uint16)
    kinds = {
        "rgb.jpg": lambda p: img.save(p), "gray.jpg": lambda p: img.convert("L").save(p),
        "cmyk.jpg": lambda p: img.convert("CMYK").save(p), "progressive.jpg": lambda p: img.save(p, progressive=True),
        "rgb.png": lambda p: img.save(p), "rgba.png": lambda p: img.convert("RGBA").save(p),
        "palette.png": lambda p: img.convert("P").save(p), "gray_alpha.png": lambda p: img.convert("LA").save(p),
        "sixteen_bit.png": lambda p: Image.fromarray(deep).save(p), "one_bit.png": lambda p: img.convert("1").save(p),
        "rgb.bmp": lambda p: img.save(p), "rgb.webp": lambda p: img.save(p, lossless=True),
        "tiny_5x5.jpg": lambda p: noise_image((5, 5), seed=1).save(p),
        "gif_named.jpg": lambda p: img.save(p, format="GIF"),  # PIL reads it, DALI does not: transcoded
    }
    good = []
    for name, write in kinds.items():
        write(root / "a" / name)
        good.append(str(root / "a" / name))
    jpeg = (root / "a" / "rgb.jpg").read_bytes()
    bad = {"truncated.jpg": jpeg[: len(jpeg) // 2], "zero.jpg": b"", "text.jpg": b"not a picture\n",
           "corrupt.jpg": jpeg[:200] + bytes(range(256)) * 8}
    for name, data in bad.items():
        (root / "b" / name).write_bytes(data)
    os.symlink(root / "b" / "missing.jpg", root / "b" / "unreadable.jpg")
    return good, sorted([str(root / "b" / n) for n in bad] + [str(root / "b" / "unreadable.jpg")])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCA_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_decodable_kind_reads_as_pil_does_and_bad_files_never_reach_dali(tmp_path, cache):
    good, bad = write_kinds(tmp_path / "data")
    images = scan_images(tmp_path / "data", bad_files="skip")
    assert sorted(images.files) == sorted(good) and sorted(p for p, _ in images.skipped) == bad
    cfg = config(tmp_path / "data", batch_size=len(good), crop_min=1.0)
    loader = D.DaliTwoViewLoader(images, cfg, 0, 1, "cpu", views=(NO_AUGMENT, NO_AUGMENT))
    assert loader.backend == "dali" and loader.num_images == len(good) and len(loader.skipped) == len(bad)
    (index, transcoded), = loader.replaced.items()
    assert transcoded.startswith(str(cache / D.TRANSCODE_FOLDER)) and images.files[index].endswith("gif_named.jpg")
    (view1, view2), = collect(loader)
    order = EpochShard(len(good), 0, 1, len(good), cfg.seed).order(0)
    for row, index in enumerate(order):
        img = open_rgb(images.files[index])
        full = T.ViewParams((0, 0, img.height, img.width), (), False, None, False, False)
        expected = np.asarray(T.apply_view(img, full, IMG_SIZE), np.float64)
        for view in (view1, view2):  # measured: 0.13-0.37 grey levels on average (DALI's vs PIL's resize)
            error = np.abs(pixels(view[row]) - expected).mean()
            assert error < 0.5, (images.files[index], error)


def test_paper_views_run_a_full_epoch_over_a_folder_with_bad_files(tmp_path, cache):
    good, bad = write_kinds(tmp_path / "data")
    loader = build_train_loader(config(tmp_path / "data"), device="cpu")
    assert isinstance(loader, D.DaliTwoViewLoader) and len(loader.skipped) == len(bad)
    batches = collect(loader)
    assert len(batches) == len(good) // 4 == len(loader)
    for x1, x2 in batches:
        assert x1.shape == x2.shape == (4, 3, IMG_SIZE, IMG_SIZE) and x1.dtype == torch.float32
        assert torch.isfinite(x1).all() and torch.isfinite(x2).all() and not torch.equal(x1, x2)
    assert loader.state_dict() == {"epoch": 1, "step": 0, "samples": 0}


def test_bad_files_error_mode_and_empty_folder_fail_before_any_pipeline(tmp_path, cache):
    write_kinds(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"bad image file .*/b/corrupt.jpg: .*bad_files=skip would skip them"):
        build_train_loader(config(tmp_path / "data", bad_files="error"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no usable images"):
        build_train_loader(config(tmp_path / "empty"), device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(12):
        noise_image((48 + 4 * i, 64 - 2 * i), seed=i).save(root / f"{i:02d}.jpg")
    return root


def test_batches_are_a_function_of_the_seed_and_epoch(folder):
    cfg = config(folder)
    reference = collect(build_train_loader(cfg))
    assert len(reference) == 3
    assert_same_batches(collect(build_train_loader(cfg)), reference)
    assert_same_batches(collect(build_train_loader(config(folder, num_workers=1))), reference)
    other_seed = collect(build_train_loader(config(folder, seed=4)))
    assert not torch.equal(other_seed[0][0], reference[0][0])
    loader = build_train_loader(cfg)
    loader.set_epoch(1)
    epoch1 = collect(loader)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(epoch1, reference))


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(folder):
    cfg = config(folder)
    reference = collect(build_train_loader(cfg))
    interrupted = build_train_loader(cfg)
    next(iter(interrupted))
    assert interrupted.state_dict() == {"epoch": 0, "step": 1, "samples": 4}
    assert_same_batches(collect(interrupted), reference[1:])  # the live pipeline continues
    resumed = build_train_loader(cfg)
    resumed.load_state_dict({"epoch": 0, "step": 2})
    assert_same_batches(collect(resumed), reference[2:])  # the reader starts at step 2


def test_one_pipeline_per_run_and_a_resume_reads_only_the_remaining_batches(folder, monkeypatch):
    built, read = [], []
    real_pipeline, real_read = D.two_view_pipeline, D._EncodedDataset.read
    monkeypatch.setattr(D, "two_view_pipeline", lambda *a, **k: built.append(1) or real_pipeline(*a, **k))
    monkeypatch.setattr(D._EncodedDataset, "read", lambda self, i: read.append(i) or real_read(self, i))
    cfg = config(folder, num_workers=0)  # the reader in this process, so that its reads are counted here
    loader = build_train_loader(cfg)
    reference = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        reference.append(collect(loader))
    assert len(built) == 1 and len(read) == 3 * 12  # each image read once per epoch, one pipeline
    built.clear()
    read.clear()
    resumed = build_train_loader(cfg)
    resumed.load_state_dict({"epoch": 2, "step": 2})
    resumed.set_epoch(2)
    assert_same_batches(collect(resumed), reference[2][2:])
    assert len(built) == 1 and len(read) == 4  # the last batch only: nothing decoded to be thrown away


def test_the_loader_reuses_the_scans_verdicts_instead_of_opening_every_file(tmp_path, cache, monkeypatch):
    good, _ = write_kinds(tmp_path / "data")
    images = scan_images(tmp_path / "data")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    D.DaliTwoViewLoader(images, config(tmp_path / "data"), 0, 1, "cpu")
    assert [f for f in opened if f.startswith(str(tmp_path / "data"))] == [str(tmp_path / "data" / "a" / "gif_named.jpg")]


def test_a_file_broken_after_the_scan_is_substituted_not_fatal(tmp_path):
    for i in range(8):
        noise_image((40, 40), seed=i).save(tmp_path / f"{i}.jpg")
    loader = build_train_loader(config(tmp_path))
    collect(loader)  # epoch 0 runs, then a file of epoch 1 breaks
    broken = loader.path(int(loader.shard.order(1)[5]))  # read in batch 1 of epoch 1
    Path(broken).write_bytes(b"overwritten after the scan")
    loader.set_epoch(1)
    batches = collect(loader)
    assert len(batches) == 2 and loader.substituted == 1 and loader.skipped[-1][0] == broken
    assert all(torch.isfinite(x).all() for pair in batches for x in pair)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_file_changed_behind_the_scan_cache_is_substituted_by_both_backends(tmp_path, backend):
    for i in range(8):
        noise_image((40, 40), seed=i).save(tmp_path / f"{i}.jpg")
    scan_images(tmp_path)  # the verdicts are cached, keyed on size and mtime
    changed = tmp_path / "3.jpg"
    st = changed.stat()
    changed.write_bytes(b"x" * st.st_size)  # no longer an image, same size and mtime: the cache says usable
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    loader = build_train_loader(config(tmp_path, data_backend=backend))
    batches = collect(loader)  # epoch 0: 2 batches of 4, every image once
    assert len(batches) == 2 and loader.substituted == 1 and loader.skipped == [(str(changed), loader.skipped[0][1])]
    assert all(torch.isfinite(x).all() for pair in batches for x in pair)


def test_the_gpu_pipeline_graph_passes_dalis_device_placement_checks(folder):
    """device_id=0 gives the nvJPEG ("mixed") decoder and GPU ops; defining its graph needs no GPU and
    raises on a CPU operator fed GPU data or a GPU tensor passed as a named argument. (Building it
    needs CUDA: not run here.)"""
    pipe = D.two_view_pipeline(lambda: None, 4, IMG_SIZE, device_id=0)
    pipe._build_graph()  # DALI's graph definition step, run before the CUDA checks of build()


# ---------------------------------------------------------------- two ranks under deepspeed

NUM_CODED = 48


def code_colour(index: int) -> tuple[int, int, int]:
    """Image `index`'s solid colour: three base-4 digits, 60 grey levels apart."""
    return tuple(30 + 60 * (index // 4**k % 4) for k in range(3))


def decode_colour(view: torch.Tensor) -> int:
    level = pixels(view).reshape(-1, 3).mean(axis=0)
    digits = np.clip(np.round((level - 30) / 60), 0, 3).astype(int)
    return int(sum(int(d) * 4**k for k, d in enumerate(digits)))


def distributed_worker(data: str, out: str) -> None:
    """Per rank: the images of each step of two epochs (identified by colour, without augmentation),
    then one epoch of the paper's views through build_train_loader."""
    import torch.distributed as dist

    from moca_fast.train.engine import init_distributed

    # the trainer's start-up (not deepspeed.init_distributed alone, which JIT-builds DeepSpeed's shared-memory
    # C++ op on a CPU: minutes on 2 cores, and again in every new virtual environment)
    started = init_distributed()
    rank, world = started.rank, started.world_size
    cfg = config(data)
    loader = D.DaliTwoViewLoader(scan_on_rank0(data, "skip"), cfg, rank, world, "cpu", views=(NO_AUGMENT,) * 2)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([[decode_colour(v) for v in x1] + [decode_colour(v) for v in x2] for x1, x2 in loader])
    paper = build_train_loader(cfg, rank, world, "cpu")
    finite = all(bool(torch.isfinite(x1).all() and torch.isfinite(x2).all()) for x1, x2 in paper)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"world": world, "epochs": epochs, "paper_finite": finite,
                                                         "paper_steps": len(paper), "backend": paper.backend}))
    dist.barrier()


def test_two_ranks_read_disjoint_shards_covering_each_epoch(tmp_path):
    data, out = tmp_path / "coded", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    for i in range(NUM_CODED):
        Image.new("RGB", (24, 24), code_colour(i)).save(data / f"{i:02d}.jpg", quality=95)
    env = {**os.environ, "MOCA_FAST_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    with socket.socket() as probe:  # a free port: other runs may hold deepspeed's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), __file__, "--data", str(data),
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    files = scan_images(data).files
    steps = NUM_CODED // 2 // 4
    for r, result in enumerate(ranks):
        assert result["world"] == 2 and result["paper_finite"] and result["paper_steps"] == steps
        assert result["backend"] == "dali"
        for epoch, batches in enumerate(result["epochs"]):
            order = EpochShard(NUM_CODED, r, 2, 4, 3).order(epoch)
            expected = [int(Path(files[i]).stem) for i in order]
            assert [b[:4] for b in batches] == [expected[s * 4:(s + 1) * 4] for s in range(steps)]
            assert [b[4:] for b in batches] == [b[:4] for b in batches]  # both views: the same images
    for epoch in range(2):
        seen = [sorted(i for b in ranks[r]["epochs"][epoch] for i in b[:4]) for r in range(2)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(NUM_CODED))  # every image once per epoch
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled each epoch


# ---------------------------------------------------------------- benchmark smoke mode

def test_data_benchmark_small_mode(tmp_path):
    out = tmp_path / "data.json"
    # 24 timed batches: enough CPU time per row for the clock's 10 ms tick (the split path is fast)
    run = subprocess.run([sys.executable, str(REPO / "bench" / "data.py"), "--small", "--steps", "24",
                          "--out", str(out)],
                         cwd=REPO, env={**os.environ, "MOCA_FAST_CACHE": str(tmp_path / "cache")},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {row["backend"]: row for row in results["rows"]}
    assert {"synthetic", "torch", "dali-cpu", "official", "pil-host", "split-host"} <= set(rows)
    if not os.environ.get("MOCA_OFFICIAL_DIR"):
        status = rows["official"]["status"]
        assert status.startswith("missing: ") and "set MOCA_OFFICIAL_DIR to a valeoai/MOCA checkout" in status
    measured = {name: row for name, row in rows.items() if row["status"] == "ok"}
    assert set(rows) - measured.keys() <= {"official"}
    assert all(row["pairs_per_s"] > 0 for row in measured.values())
    assert results["split"]["device_part"]["ms_per_batch"] > 0
    lines = run.stdout.strip().splitlines()
    assert lines[-len(rows) - 2].split() == ["backend", "workers", "device", "pairs/s", "pairs/cpu-s", "startup", "s",
                                             "status"]
    assert all(row["pairs_per_cpu_s"] > 0 for row in measured.values() if row["backend"] != "synthetic")
    assert [line.split()[0] for line in lines[-len(rows):]] == [row["backend"] for row in results["rows"]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    distributed_worker(args.data, args.out)
