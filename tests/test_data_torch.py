"""Two-view transforms, the torch/PIL train and eval loaders, and the synthetic loader, on real JPEGs."""
import collections
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

from moca_fast.config import load_config
from moca_fast.data import build_eval_loader, build_train_loader, scan_images, select_backend
from moca_fast.data import transforms as T
from moca_fast.data.sharding import EpochShard, sample_rng
from moca_fast.data.synthetic import IMAGENET_TRAIN_IMAGES
from moca_fast.errors import ConfigError
from jpeg_folder import assert_same_batches, collect
from spawned_ranks import CONTEXT, start_ranks

NUM_IMAGES = 23


def write_jpegs(root, count, classes=3, seed=0):
    """`count` random JPEGs of varied sizes (20-59 px a side) in `classes` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        (root / f"c{i % classes}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i % classes}" / f"{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_jpegs(tmp_path_factory.mktemp("imgs"), NUM_IMAGES)


def config(folder, **overrides):
    base = dict(data=str(folder), data_backend="torch", img_size=32, batch_size=4, num_workers=0, seed=3)
    return load_config("tiny", overrides={**base, **overrides})


# ---------------------------------------------------------------- transforms

def test_view_params_follow_the_official_probabilities_and_ranges():
    rng, n, crop_min = random.Random(0), 4000, 0.2
    counts = collections.Counter()
    orders = set()
    for _ in range(n):
        for view, recipe in enumerate(T.VIEWS):
            p = T.sample_view_params(rng, 120, 90, recipe, crop_min)
            top, left, h, w = p.crop
            assert 0 <= top <= 90 - h and 0 <= left <= 120 - w
            assert crop_min * 0.9 <= h * w / (120 * 90) <= 1.0  # rounding of w, h: a few % of area
            counts[view, "jitter"] += bool(p.jitter)
            counts[view, "gray"] += p.grayscale
            counts[view, "blur"] += p.blur_radius is not None
            counts[view, "solarize"] += p.solarize
            counts[view, "flip"] += p.flip
            if p.blur_radius is not None:
                assert T.BLUR_RADIUS[0] <= p.blur_radius <= T.BLUR_RADIUS[1]
            factors = dict(p.jitter)
            if factors:
                orders.add(tuple(factors))
                assert 0.6 <= factors["brightness"] <= 1.4 and 0.6 <= factors["contrast"] <= 1.4
                assert 0.8 <= factors["saturation"] <= 1.2 and -0.1 <= factors["hue"] <= 0.1
    expected = {"jitter": (0.8, 0.8), "gray": (0.2, 0.2), "blur": (1.0, 0.1), "solarize": (0.0, 0.2),
                "flip": (0.5, 0.5)}
    for name, probs in expected.items():
        for view, prob in enumerate(probs):
            tolerance = 5 * np.sqrt(prob * (1 - prob) / n) + 1e-9  # 5 binomial standard deviations
            assert abs(counts[view, name] / n - prob) <= tolerance, (name, view, counts[view, name])
    assert len(orders) == 24  # the four jitter ops come in every order


def test_crop_falls_back_to_the_center_like_torchvision():
    # A 1000x2 image: no crop of area >= 20% with ratio in [3/4, 4/3] fits, so the center crop of
    # height 2 and width round(2 * 4/3) = 3 is used (RandomResizedCrop.get_params' fallback).
    assert T.sample_crop(random.Random(0), 1000, 2, (0.2, 1.0)) == (0, 498, 2, 3)
    assert T.sample_crop(random.Random(0), 2, 1000, (0.2, 1.0)) == (498, 0, 3, 2)


def test_apply_view_is_the_official_op_sequence():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    jitter = (("hue", 0.05), ("contrast", 1.3), ("saturation", 0.9), ("brightness", 0.7))
    params = T.ViewParams(crop=(5, 7, 30, 40), jitter=jitter, grayscale=False, blur_radius=1.2,
                          solarize=True, flip=True)
    expected = TF.resized_crop(img, 5, 7, 30, 40, [24, 24], InterpolationMode.BILINEAR, antialias=True)
    expected = TF.adjust_hue(expected, 0.05)
    expected = TF.adjust_contrast(expected, 1.3)
    expected = TF.adjust_saturation(expected, 0.9)
    expected = TF.adjust_brightness(expected, 0.7)
    expected = expected.filter(ImageFilter.GaussianBlur(radius=1.2))
    expected = TF.hflip(ImageOps.solarize(expected, 128))
    expected = TF.normalize(TF.to_tensor(expected), T.IMAGENET_MEAN, T.IMAGENET_STD)
    got = T.Normalizer("cpu")(T.to_uint8_tensor(T.apply_view(img, params, 24))[None])[0]
    assert torch.equal(got, expected)  # same ops, same fp32 arithmetic: bit-exact

    gray = T.apply_view(img, T.ViewParams((0, 0, 50, 70), (), True, None, False, False), 24)
    assert np.ptp(np.asarray(gray).astype(int), axis=2).max() == 0  # grayscale: R = G = B


def test_eval_transform_resizes_by_256_over_224_and_center_crops():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 80, 3), dtype=np.uint8))
    out = T.EvalTransform(28)(img)
    expected = TF.center_crop(TF.resize(img, 32, InterpolationMode.BICUBIC), [28, 28])
    assert out.dtype == torch.uint8 and out.shape == (3, 28, 28)
    assert torch.equal(out, TF.pil_to_tensor(expected))


# ---------------------------------------------------------------- train loader

def test_batches_are_the_rank_shard_augmented_per_position(folder):
    cfg = config(folder)
    loader = build_train_loader(cfg, rank=1, world_size=2)
    assert loader.backend == "torch" and loader.num_images == NUM_IMAGES and loader.skipped == []
    assert len(loader) == (NUM_IMAGES // 2) // 4 == 2
    loader.set_epoch(4)
    batches = collect(loader)
    assert len(batches) == 2

    files = scan_images(folder).files
    order = EpochShard(NUM_IMAGES, 1, 2, 4, cfg.seed).order(4)
    transform, normalize = T.TwoViewTransform(32, cfg.crop_min), T.Normalizer("cpu")
    for step, (x1, x2) in enumerate(batches):
        assert x1.shape == x2.shape == (4, 3, 32, 32) and x1.dtype == torch.float32
        for i in range(4):
            position = step * 4 + i
            img = Image.open(files[order[position]]).convert("RGB")
            v1, v2 = transform(img, sample_rng(cfg.seed, 4, 1 + 2 * position))  # rank 1 of 2: global 1 + 2p
            assert torch.equal(x1[i], normalize(v1[None])[0]) and torch.equal(x2[i], normalize(v2[None])[0])
        assert not torch.equal(x1, x2)
        pixels = (torch.cat([x1, x2]) * torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
                  + torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)) * 255
        assert (pixels - pixels.round()).abs().max() < 1e-3  # normalised 8-bit values (fp32 rounding)
        assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_rank_shards_are_disjoint_and_cover_the_epoch():
    for world_size in (1, 2, 3):
        shards = [EpochShard(NUM_IMAGES, r, world_size, 2, seed=7) for r in range(world_size)]
        for epoch in (0, 1):
            parts = [set(s.order(epoch).tolist()) for s in shards]
            union = set().union(*parts)
            assert sum(map(len, parts)) == len(union) == (NUM_IMAGES // world_size) * world_size
        assert shards[0].order(0).tolist() != shards[0].order(1).tolist()


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(folder):
    cfg = config(folder, batch_size=3)
    full = build_train_loader(cfg)
    full.set_epoch(1)
    expected = collect(full)
    assert full.state_dict() == {"epoch": 2, "step": 0, "samples": 0}

    interrupted = build_train_loader(cfg)
    interrupted.set_epoch(1)
    for step, _ in enumerate(interrupted):
        if step == 2:
            break
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "step": 3, "samples": 9}

    resumed = build_train_loader(cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a training loop's set_epoch keeps the resumed position
    assert_same_batches(collect(resumed), expected[3:])


def _samples(batches) -> list[torch.Tensor]:
    """The (view1, view2) of every sample of a list of batches, in order."""
    return [torch.stack([x1[i], x2[i]]) for x1, x2 in batches for i in range(len(x1))]


def test_the_epoch_order_and_views_are_global_and_a_position_resumes_on_another_world_size(folder):
    cfg = config(folder, batch_size=2)  # global batch 4: 2 ranks x grad_accum 1, or 1 rank x grad_accum 2
    one = build_train_loader(cfg, 0, 1)
    one.set_epoch(1)
    single = _samples(collect(one))
    ranks = [build_train_loader(cfg, r, 2) for r in range(2)]
    per_rank = []
    for loader in ranks:
        loader.set_epoch(1)
        per_rank.append(_samples(collect(loader)))
    # micro-batch j of the two ranks together is the single rank's samples 4j .. 4j+3: rank r has 4j + r + 2i
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    for rank, samples in enumerate(per_rank):
        for p, sample in enumerate(samples):
            assert torch.equal(sample, single[rank + 2 * p]), (rank, p)

    # stopped on 2 ranks after 2 batches each (8 samples), continued on 1 rank: its samples from the 9th on
    stopped = []
    for loader in [build_train_loader(cfg, r, 2) for r in range(2)]:
        loader.set_epoch(1)
        for step, _ in enumerate(loader):
            if step == 1:
                break
        stopped.append(loader.state_dict())
    assert stopped == [{"epoch": 1, "step": 2, "samples": 8}] * 2
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(stopped[0])
    resumed.set_epoch(1)
    assert resumed.state_dict()["step"] == 4
    remaining = _samples(collect(resumed))
    assert len(remaining) == len(single) - 8 and all(torch.equal(a, b) for a, b in zip(remaining, single[8:]))

    # and back: stopped on 1 rank after 4 batches (8 samples), continued on 2 ranks
    for rank in range(2):
        resumed = build_train_loader(cfg, rank, 2)
        resumed.load_state_dict({"epoch": 1, "step": 4, "samples": 8})
        resumed.set_epoch(1)
        assert all(torch.equal(a, single[8 + rank + 2 * p]) for p, a in enumerate(_samples(collect(resumed))))
    with pytest.raises(ConfigError, match="samples=6 is not a whole number of batches of batch_size=2 x 2 ranks"):
        build_train_loader(cfg, 0, 2).load_state_dict({"epoch": 1, "step": 3, "samples": 6})


def test_batches_depend_on_the_seed_not_on_the_workers(folder):
    cfg = config(folder)
    reference = collect(build_train_loader(cfg))
    with_workers = build_train_loader(config(folder, num_workers=2))
    assert_same_batches(collect(with_workers), reference)
    with_workers.set_epoch(1)
    next(iter(with_workers))  # a partial pass leaves batches prefetched in the persistent workers
    with_workers.set_epoch(2)
    single = build_train_loader(cfg)
    single.set_epoch(2)
    assert_same_batches(collect(with_workers), collect(single))
    other = collect(build_train_loader(config(folder, seed=4)))
    assert not torch.equal(other[0][0], reference[0][0])


def test_a_file_unreadable_mid_run_is_substituted_and_counted(tmp_path):
    write_jpegs(tmp_path, 8, classes=1)
    cfg = config(tmp_path)
    loader = build_train_loader(cfg)
    files = scan_images(tmp_path).files
    index = EpochShard(8, 0, 1, 4, cfg.seed).order(0)[5]  # the 6th sample: batch 1, row 1
    with open(files[index], "wb") as f:
        f.write(b"corrupted after the scan")
    batches = collect(loader)
    assert len(batches) == 2 and loader.substituted == 1
    assert [p for p, _ in loader.skipped] == [files[index]]
    substitute = Image.open(files[(index + 1) % 8]).convert("RGB")
    v1, _ = T.TwoViewTransform(32, cfg.crop_min)(substitute, sample_rng(cfg.seed, 0, 5))
    assert torch.equal(batches[1][0][1], T.Normalizer("cpu")(v1[None])[0])


def test_too_few_images_per_rank_is_a_config_error(folder):
    with pytest.raises(ConfigError, match=rf"data folder {folder} has 23 usable images, 5 per rank over 4 ranks: "
                                          r"fewer than batch_size=8"):
        build_train_loader(config(folder, batch_size=8), rank=0, world_size=4)


def test_auto_backend_on_cpu_is_torch():
    assert select_backend("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match="data_backend='jpeg'"):
        select_backend("jpeg", "cpu")


# ---------------------------------------------------------------- eval loader

def test_eval_loader_gives_every_image_once_over_the_ranks(folder):
    cfg = config(folder)
    images = scan_images(folder)
    seen = []
    for rank in range(2):
        loader = build_eval_loader(folder, cfg, rank=rank, world_size=2, batch_size=5)
        assert loader.num_images == NUM_IMAGES and loader.classes == ["c0", "c1", "c2"]
        assert len(loader) == 3  # 12 or 11 images in batches of 5, the last one short
        for x, labels, indices in loader:
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
            assert labels.tolist() == [images.labels[i] for i in indices.tolist()]
            seen += indices.tolist()
    assert sorted(seen) == list(range(NUM_IMAGES))


# ---------------------------------------------------------------- synthetic

def test_synthetic_loader_is_deterministic_and_resumable():
    cfg = load_config("tiny", overrides=dict(data_backend="synthetic", img_size=16, batch_size=2, seed=1))
    loader = build_train_loader(cfg, rank=1, world_size=4)
    assert loader.backend == "synthetic" and loader.num_images == IMAGENET_TRAIN_IMAGES
    assert len(loader) == IMAGENET_TRAIN_IMAGES // (2 * 4)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    assert first[0][0].shape == (2, 3, 16, 16) and first[0][0].dtype == torch.float32
    assert not torch.equal(first[0][0], first[0][1]) and not torch.equal(first[0][0], first[1][0])

    resumed = build_train_loader(cfg, rank=1, world_size=4)
    resumed.load_state_dict({"epoch": 0, "step": 1})
    assert_same_batches([next(iter(resumed))], first[1:2])
    other_rank = next(iter(build_train_loader(cfg, rank=0, world_size=4)))
    assert not torch.equal(other_rank[0], first[0][0])


# ---------------------------------------------------------------- distributed scan

def _scan_on_two_ranks(rank, root, bad_files, init_file, results):
    import torch.distributed as dist

    from moca_fast.data import scan_on_rank0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results.put((rank, scan_on_rank0(root, bad_files).files))
    except ConfigError as e:
        results.put((rank, f"ConfigError: {e}"))
    finally:
        dist.destroy_process_group()


def test_rank0_scans_and_every_rank_gets_its_list_or_its_error(tmp_path):
    folder = write_jpegs(tmp_path / "imgs", 6)
    for run, bad_files in enumerate(("skip", "error")):
        if bad_files == "error":
            (folder / "c0" / "zz_bad.jpg").write_bytes(b"")
        results = CONTEXT.Queue()
        init_file = tmp_path / f"init{run}"
        procs = start_ranks(_scan_on_two_ranks, [(r, str(folder), bad_files, init_file, results) for r in range(2)])
        got = dict(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        if bad_files == "skip":
            assert got[0] == got[1] == scan_images(folder).files
        else:
            assert got[0] == got[1] and got[0].startswith(f"ConfigError: bad image file {folder}/c0/zz_bad.jpg")
