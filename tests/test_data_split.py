"""The split pipeline: the device-side photometric operations against torchvision's PIL path, the workers' crop
and flip with the JPEG decoder's DCT scaling, and the split loader against the PIL-only loader on real JPEGs.

Tolerance: 0 grey levels, everywhere the full image is decoded. The torch operations repeat PIL's arithmetic
step by step (float32 where PIL computes in float, double where it computes in double, its 8.24 fixed-point box
blur and 16.16 luma in integers), so there is no rounding difference to allow for; a mismatch of one level is a
real departure from the reference. Only a JPEG decoded at a reduced DCT scale differs, by the decoder's
downscaling (a bounded mean difference, test below).
"""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from moca_fast.config import ConfigError, load_config
from moca_fast.data import build_train_loader
from moca_fast.data import photometric as P
from moca_fast.data import transforms as T
from moca_fast.data.split_views import CropFlipTwoViews
from jpeg_folder import collect

SIZE = 40


def photo(rng: np.random.Generator, h: int = SIZE, w: int = SIZE) -> Image.Image:
    """A smooth colour field with noise: saturated, grey and dark pixels all occur."""
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(low, np.float32) + rng.normal(0, 25, (h, w, 3))
    pixels[: h // 4, : w // 4] = pixels[: h // 4, : w // 4].mean(axis=2, keepdims=True)  # a grey corner
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [photo(rng) for _ in range(12)]


def batch(images) -> torch.Tensor:
    return torch.stack([T.to_uint8_tensor(img) for img in images])


def reference(images, op) -> torch.Tensor:
    return torch.stack([T.to_uint8_tensor(op(img, k)) for k, img in enumerate(images)])


def assert_equal_images(got: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (got.to(torch.int32) - expected.to(torch.int32)).abs()
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert int(diff.max()) == 0, f"{int((diff > 0).sum())} values differ, by up to {int(diff.max())}"


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blends_match_pil(images, name):
    factors = torch.linspace(0.55, 1.45, len(images), dtype=torch.float64)  # below and above 1: both PIL branches
    torch_op = {"brightness": P.adjust_brightness, "contrast": P.adjust_contrast, "saturation": P.adjust_saturation}
    pil_op = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}
    got = torch_op[name](batch(images), factors.to(torch.float32))
    assert_equal_images(got, reference(images, lambda img, k: pil_op[name](img, float(factors[k]))))


def test_hue_matches_pil(images):
    hues = np.linspace(-0.1, 0.1, len(images))
    shifts = torch.tensor([P.pack_params(T.ViewParams((0, 0, 1, 1), (("hue", h),), False, None, False, False))[
        P.COLUMNS.index("hue_shift")] for h in hues])
    assert_equal_images(P.adjust_hue(batch(images), shifts.to(torch.int32)),
                        reference(images, lambda img, k: TF.adjust_hue(img, float(hues[k]))))


def test_grayscale_and_solarize_match_pil(images):
    assert_equal_images(P.grayscale(batch(images)), reference(images, lambda img, k: TF.rgb_to_grayscale(img, 3)))
    assert_equal_images(P.solarize(batch(images)), reference(images, lambda img, k: ImageOps.solarize(img, 128)))


def test_gaussian_blur_matches_pil_per_sample_radius(images):
    radii = np.linspace(T.BLUR_RADIUS[0], T.BLUR_RADIUS[1], len(images))
    weights = torch.tensor([P.box_blur_weights(r) for r in radii])
    assert {int(r) for r in weights[:, 0]} == {0, 1}  # both of PIL's line blurs (radius 0 and above) are covered
    got = P.gaussian_blur(batch(images), weights[:, 0], weights[:, 1], weights[:, 2])
    expected = reference(images, lambda img, k: img.filter(ImageFilter.GaussianBlur(radius=float(radii[k]))))
    assert_equal_images(got, expected)


def test_photometric_module_matches_apply_view_for_sampled_parameters(images):
    """Each sample's own choices from sample_views (jitter orders, grayscale, blur, solarize mixed in one batch),
    the crop the whole image and no flip, so that apply_view does the photometric part only."""
    rng = random.Random(7)
    for _ in range(3):
        params = [T.sample_views(rng, SIZE, SIZE, 0.2)[k % 2] for k in range(len(images))]
        params = [T.ViewParams((0, 0, SIZE, SIZE), p.jitter, p.grayscale, p.blur_radius, p.solarize, False)
                  for p in params]
        got = P.Photometric()(batch(images), torch.stack([P.pack_params(p) for p in params]))
        assert_equal_images(got, reference(images, lambda img, k: T.apply_view(img, params[k], SIZE)))


def test_draft_reduction_keeps_every_crop_at_least_the_view_size():
    assert T.draft_reduction([(0, 0, 900, 1000), (5, 5, 450, 460)], 224) == 2
    assert T.draft_reduction([(0, 0, 1800, 1800), (0, 0, 1792, 1900)], 224) == 8
    assert T.draft_reduction([(0, 0, 447, 1000), (0, 0, 900, 900)], 224) == 1


def test_crop_flip_decodes_a_large_jpeg_at_reduced_scale_close_to_the_full_decode(tmp_path):
    path = tmp_path / "large.jpg"
    photo(np.random.default_rng(1), 480, 640).save(path, quality=95)
    transform, rng_seed = CropFlipTwoViews(img_size=32, crop_min=0.5), 11
    views = T.sample_views(random.Random(rng_seed), 640, 480, 0.5)
    assert T.draft_reduction([v.crop for v in views], 32) > 1
    view1, view2, params = transform(str(path), random.Random(rng_seed))
    full = Image.open(path).convert("RGB")
    for got, v in zip((view1, view2), views):
        expected = T.to_uint8_tensor(T.crop_and_flip(full, v, 32))
        mean_diff = (got.float() - expected.float()).abs().mean()
        assert mean_diff < 3.0, f"reduced-scale view differs from the full decode by {mean_diff:.2f} on average"
    assert torch.equal(params, torch.stack([P.pack_params(v) for v in views]))


def test_split_loader_equals_the_pil_loader_on_small_jpegs(tmp_path):
    """Images too small for DCT scaling: decode, crop, flip on the workers and the operations batched on the
    device give the PIL path's batches exactly (flip commutes with every photometric operation)."""
    rng = np.random.default_rng(2)
    (tmp_path / "c0").mkdir()
    for i in range(10):
        photo(rng, int(rng.integers(30, 70)), int(rng.integers(30, 70))).save(tmp_path / "c0" / f"{i}.jpg")
    base = dict(data=str(tmp_path), data_backend="torch", img_size=24, batch_size=4, num_workers=0, seed=5)
    pil = collect(build_train_loader(load_config("tiny", overrides={**base, "photometric_on": "workers"})))
    split_loader = build_train_loader(load_config("tiny", overrides={**base, "photometric_on": "device"}))
    assert split_loader.split
    split = collect(split_loader)
    assert len(pil) == len(split) == 2
    for (a1, a2), (b1, b2) in zip(pil, split):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_photometric_on_auto_keeps_the_workers_on_the_cpu_and_refuses_unknown_values(tmp_path):
    from moca_fast.data.torch_backend import photometric_on_device

    assert not photometric_on_device("auto", torch.device("cpu"))
    assert photometric_on_device("auto", torch.device("cuda"))
    assert photometric_on_device("device", torch.device("cpu"))
    with pytest.raises(ConfigError, match="photometric_on='gpu' must be one of auto, device, workers"):
        load_config("tiny", overrides=dict(photometric_on="gpu")).validate_data()


def test_split_loader_resumes_at_the_saved_step_with_the_same_batches(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "c0").mkdir()
    for i in range(12):
        photo(rng, 40, 50).save(tmp_path / "c0" / f"{i}.jpg")
    cfg = load_config("tiny", overrides=dict(data=str(tmp_path), data_backend="torch", img_size=24, batch_size=4,
                                             num_workers=0, seed=8, photometric_on="device"))
    full = collect(build_train_loader(cfg))
    resumed = build_train_loader(cfg)
    resumed.load_state_dict({"epoch": 0, "step": 2})
    rest = collect(resumed)
    assert len(full) == 3 and len(rest) == 1
    assert torch.equal(rest[0][0], full[2][0]) and torch.equal(rest[0][1], full[2][1])


def test_a_checkpoint_from_before_the_setting_or_with_another_value_resumes():
    from moca_fast.train.loop import RUN_FIELDS
    from moca_fast.train.run_guard import check_resume_settings

    new = load_config("tiny").to_dict()
    older = {k: v for k, v in new.items() if k != "photometric_on"}
    check_resume_settings(older, new, RUN_FIELDS)
    check_resume_settings({**new, "photometric_on": "workers"}, new, RUN_FIELDS)
    with pytest.raises(ConfigError, match="crop_min"):
        check_resume_settings({**new, "crop_min": 0.3}, new, RUN_FIELDS)
