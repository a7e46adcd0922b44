"""The nvjpeg backend's code path on the CPU (torchvision's decode_jpeg with libjpeg on CPU tensors): views
against the PIL path, worker-decoded formats, determinism and resume, a JPEG that no decoder reads, and auto's
choice on a GPU without DALI."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import moca_fast.data as data
from moca_fast.config import load_config
from moca_fast.data import build_train_loader, select_backend
from moca_fast.data import transforms as T
from moca_fast.data.nvjpeg import NvjpegTwoViewLoader
from jpeg_folder import assert_same_batches, collect

IMG_SIZE = 24
IMAGENET = (torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1))


def photo(rng, h, w):
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(low, np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Colour JPEGs, one greyscale JPEG (decoded on the device too) and one PNG (decoded in the workers)."""
    root = tmp_path_factory.mktemp("nvjpeg") / "c0"
    root.mkdir()
    rng = np.random.default_rng(4)
    for i in range(10):
        Image.fromarray(photo(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))).save(root / f"{i}.jpg",
                                                                                                   quality=95)
    Image.fromarray(photo(rng, 60, 50)[..., 0]).save(root / "10_grey.jpg", quality=95)
    Image.fromarray(photo(rng, 50, 60)).save(root / "11.png")
    return root.parent


def config(folder, **overrides):
    base = dict(data=str(folder), data_backend="nvjpeg", img_size=IMG_SIZE, batch_size=4, num_workers=0, seed=2)
    return load_config("tiny", overrides={**base, **overrides})


def grey_levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised float32 [B, 3, S, S] back to 0..255."""
    return (x * IMAGENET[1] + IMAGENET[0]) * 255


def test_views_are_the_pil_paths_within_a_few_grey_levels(folder):
    """Tolerance: the decoders (libjpeg through torchvision here, nvJPEG on a GPU) and the resize filters (torch's
    antialiased bilinear against PIL's) differ by rounding: a mean of at most 1.5 grey levels per view; the
    photometric operations are the split path's, exact."""
    nvjpeg = build_train_loader(config(folder))
    assert isinstance(nvjpeg, NvjpegTwoViewLoader) and nvjpeg.backend == "nvjpeg"
    pil = collect(build_train_loader(config(folder, data_backend="torch", photometric_on="workers")))
    ours = collect(nvjpeg)
    assert len(ours) == len(pil) == 3
    for (a1, a2), (b1, b2) in zip(ours, pil):
        for a, b in ((a1, b1), (a2, b2)):
            assert a.shape == b.shape == (4, 3, IMG_SIZE, IMG_SIZE) and a.dtype == torch.float32
            per_view = (grey_levels(a) - grey_levels(b)).abs().mean(dim=(1, 2, 3))
            assert float(per_view.max()) <= 1.5, per_view


def test_batches_are_deterministic_and_a_resume_continues_exactly(folder):
    first = build_train_loader(config(folder))
    full = collect(first)
    assert_same_batches(full, collect(build_train_loader(config(folder))))
    resumed = build_train_loader(config(folder))
    resumed.load_state_dict({"epoch": 0, "step": 1})
    assert_same_batches(full[1:], collect(resumed))


def test_a_jpeg_no_decoder_reads_is_replaced_by_the_batchs_next_image(folder, caplog):
    loader = build_train_loader(config(folder))
    encoded, ready, params, geometry, _ = next(iter(loader.host_batches()))
    jpegs = [i for i, data in enumerate(encoded) if data.numel()]
    assert len(jpegs) >= 2
    broken = jpegs[0]
    encoded[broken] = torch.frombuffer(bytearray(b"\xff\xd8\xff" + bytes(200)), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="moca_fast.data"):
        views = loader._decode_crop_flip(encoded, ready.clone(), geometry)
    assert loader.substituted == 1
    assert any("no longer decodes" in r.getMessage() for r in caplog.records)
    assert torch.equal(views[broken], views[broken + 1])


def test_auto_on_a_gpu_without_dali_chooses_nvjpeg_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(data, "_dali_missing", lambda device: "DALI does not import (no module named nvidia)")
    monkeypatch.setattr(data, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="moca_fast.data"):
        assert select_backend("auto", "cuda") == "nvjpeg"
    assert "data backend: nvjpeg (auto; not DALI: DALI does not import (no module named nvidia))" in caplog.text
    assert select_backend("auto", "cpu") == "torch"
