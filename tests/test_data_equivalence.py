"""Statistical equivalence of the DALI (CPU pipeline) and torchvision/PIL backends' two views.

Both backends draw N_PAIRS pairs of views of the same images. Compared per view: the crop
geometry (area fraction, log aspect, centre), blur sigma and jitter factors (two-sample
Kolmogorov-Smirnov), the jitter order (two-sample chi-square over the 24 orders), the jitter /
grayscale / blur / solarize / flip rates (two-proportion z), the grayscale rate measured on the
output images, and the per-image channel means and standard deviations of the normalised output
(Welch z on their averages). DALI's choices are the pipeline's exposed parameters, torchvision's
are transforms.sample_view_params, the function its loader calls.

Bounds: |z| <= 4 (two-sided p = 6e-5 per check), KS D <= 2.23 * sqrt((n + m) / (n m))
(p = 1e-4), chi-square(23) <= 57.07 (p = 1e-4); about 50 checks, so a correct pipeline fails
with probability < 0.5 % under a new seed (the runs are seeded, so the outcome is fixed). A
probability mis-set from 0.2 to 0.4 moves its rate by about 14 standard errors at N_PAIRS = 2048;
test_a_mis_set_probability_fails shows it is caught. Beyond the distributions,
test_dali_views_match_torchvision_for_the_same_random_choices replays DALI's choices through the
torchvision backend's apply_view and compares the pixels, view by view.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from moca_fast.data import dali as D
from moca_fast.data import transforms as T
from moca_fast.data.scan import open_rgb
from moca_fast.data.sharding import sample_rng

N_PAIRS = 2048
BATCH = 256
IMG_SIZE = 32
CROP_MIN = 0.2
Z_MAX = 4.0
KS_COEFF = 2.23
CHI2_23_MAX = 57.07
GRAY_TOLERANCE = 0.25 / 255  # unnormalised channel difference below which a view counts as gray


def natural_images(root, count=48, seed=0):
    """Colourful smooth images with noise, 24-120 px a side, aspects from 1:2 to 2:1, as JPEGs."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        w, h = int(rng.integers(24, 121)), int(rng.integers(24, 121))
        if i % 8 == 0:  # 2:1 images exercise the crop's fallback (no valid crop in 10 attempts)
            w, h = 2 * min(h, 60), min(h, 60)
        low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(low, dtype=np.float64) + rng.normal(0, 12, (h, w, 3))
        path = root / f"{i:03d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return natural_images(tmp_path_factory.mktemp("natural"))


def unnormalise(x: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] normalised -> [0, 1] pixel values."""
    return x * np.array(T.IMAGENET_STD).reshape(1, 3, 1, 1) + np.array(T.IMAGENET_MEAN).reshape(1, 3, 1, 1)


def output_stats(views: np.ndarray) -> dict:
    """Per-image statistics of normalised views [N, 3, S, S]."""
    pixels = unnormalise(views)
    spread = np.maximum(np.abs(pixels[:, 0] - pixels[:, 1]), np.abs(pixels[:, 1] - pixels[:, 2]))
    return {"channel_mean": views.mean(axis=(2, 3)), "channel_std": views.std(axis=(2, 3)),
            "gray_measured": spread.max(axis=(1, 2)) < GRAY_TOLERANCE}


def view_record(image_hw, crop, jitter, factors, order, grayscale, blur, sigma, solarize, flip, views):
    """Per-sample arrays of one backend's view (crop = (top, left, h, w) rows)."""
    (height, width), (top, left, h, w) = np.asarray(image_hw, float).T, np.asarray(crop, float).T
    record = {"crop_scale": h * w / (height * width), "crop_log_aspect": np.log(w / h),
              "crop_centre_x": (left + w / 2) / width, "crop_centre_y": (top + h / 2) / height,
              "jitter": np.asarray(jitter, bool), "grayscale": np.asarray(grayscale, bool),
              "blur": np.asarray(blur, bool), "solarize": np.asarray(solarize, bool),
              "flip": np.asarray(flip, bool), "blur_sigma": np.asarray(sigma, float),
              "jitter_factors": np.asarray(factors, float).reshape(-1, 4), "jitter_order": np.asarray(order)}
    return {**record, **output_stats(views)}


def run_dali(files, views=D.PAPER_VIEWS, seed=11, pairs=N_PAIRS, batch=BATCH) -> dict:
    """All outputs (D.output_names(True)) of `pairs` pairs from the DALI CPU pipeline, stacked."""
    names = D.output_names(expose_params=True)
    pipe = D.two_view_pipeline([files[i % len(files)] for i in range(pairs)], batch, IMG_SIZE, CROP_MIN,
                               seed, num_threads=2, views=views, expose_params=True)
    pipe.build()
    columns = {name: [] for name in names}
    for _ in range(pairs // batch):
        for name, out in zip(names, pipe.run()):
            columns[name].append(np.array(out.as_tensor()))
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def dali_samples(files, views=D.PAPER_VIEWS, seed=11):
    c = run_dali(files, views, seed)
    records = []
    for v in D.VIEW_NAMES:
        crop = np.concatenate([c[f"{v}_crop_anchor"], c[f"{v}_crop_shape"]], axis=1)
        records.append(view_record(c[f"{v}_image_shape"][:, :2], crop, c[f"{v}_jitter"], c[f"{v}_jitter_factors"],
                                   c[f"{v}_jitter_order"], c[f"{v}_grayscale"], c[f"{v}_blur"],
                                   np.where(c[f"{v}_blur"], c[f"{v}_blur_sigma"], np.nan), c[f"{v}_solarize"],
                                   c[f"{v}_flip"], c[v]))
    return records


def dali_choices_as_view_params(c: dict, view: str, i: int) -> T.ViewParams:
    """Sample i's random choices in DALI's view `view`, as the torchvision backend's ViewParams."""
    (top, left), (h, w) = c[f"{view}_crop_anchor"][i], c[f"{view}_crop_shape"][i]
    factors = c[f"{view}_jitter_factors"][i]
    jitter = tuple((D.JITTER_OPS[k], float(factors[k])) for k in D.JITTER_ORDERS[c[f"{view}_jitter_order"][i]])
    return T.ViewParams(crop=(int(top), int(left), int(h), int(w)), jitter=jitter if c[f"{view}_jitter"][i] else (),
                        grayscale=bool(c[f"{view}_grayscale"][i]),
                        blur_radius=float(c[f"{view}_blur_sigma"][i]) if c[f"{view}_blur"][i] else None,
                        solarize=bool(c[f"{view}_solarize"][i]), flip=bool(c[f"{view}_flip"][i]))


def torch_samples(files, seed=11):
    images = [open_rgb(f) for f in files]
    normalize = T.Normalizer("cpu")
    per_view = [dict(hw=[], crop=[], params=[], views=[]) for _ in T.VIEWS]
    for pos in range(N_PAIRS):
        img = images[pos % len(images)]
        rng = sample_rng(seed, 0, 0, pos)
        for store, recipe in zip(per_view, T.VIEWS):
            params = T.sample_view_params(rng, img.width, img.height, recipe, CROP_MIN)
            store["hw"].append((img.height, img.width))
            store["crop"].append(params.crop)
            store["params"].append(params)
            store["views"].append(T.to_uint8_tensor(T.apply_view(img, params, IMG_SIZE)))
    records = []
    for store in per_view:
        ps = store["params"]
        factors = [[dict(p.jitter).get(op, np.nan) for op in D.JITTER_OPS] for p in ps]
        order = [D.JITTER_ORDERS.index(tuple(D.JITTER_OPS.index(name) for name, _ in p.jitter)) if p.jitter else -1
                 for p in ps]
        records.append(view_record(store["hw"], store["crop"], [bool(p.jitter) for p in ps], factors, order,
                                   [p.grayscale for p in ps], [p.blur_radius is not None for p in ps],
                                   [np.nan if p.blur_radius is None else p.blur_radius for p in ps],
                                   [p.solarize for p in ps], [p.flip for p in ps],
                                   normalize(torch.stack(store["views"])).numpy()))
    return records


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def distribution_check(label: str, a: np.ndarray, b: np.ndarray) -> list[str]:
    """Two-sample KS on the drawn values (NaN: not drawn); a failure message or nothing."""
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not (len(a) and len(b)):
        return [] if len(a) == len(b) else [f"{label}: drawn by one backend only ({len(a)} vs {len(b)})"]
    stat, bound = ks_statistic(a, b), KS_COEFF * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    return [f"{label}: KS D={stat:.3f} > {bound:.3f}"] if stat > bound else []


def mean_check(label: str, a: np.ndarray, b: np.ndarray) -> list[str]:
    """Welch z on the means (two-proportion z for 0/1 samples); a failure message or nothing."""
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    diff = a.mean() - b.mean()
    if abs(diff) <= Z_MAX * se + 1e-12:
        return []
    return [f"{label}: {a.mean():.4f} (DALI) vs {b.mean():.4f} (torch), z={diff / max(se, 1e-12):.1f}"]


def compare(dali: list[dict], reference: list[dict]) -> list[str]:
    """The checks of the module docstring; returns the failed ones (empty when equivalent)."""
    failures = []
    for view, (d, r) in enumerate(zip(dali, reference), start=1):
        for name in ("crop_scale", "crop_log_aspect", "crop_centre_x", "crop_centre_y", "blur_sigma"):
            failures += distribution_check(f"view {view} {name}", d[name], r[name])
        for k, op in enumerate(D.JITTER_OPS):
            failures += distribution_check(f"view {view} {op} factor", d["jitter_factors"][d["jitter"], k],
                                           r["jitter_factors"][r["jitter"], k])
        orders = [np.bincount(x["jitter_order"][x["jitter"]], minlength=len(D.JITTER_ORDERS)) for x in (d, r)]
        chi2 = _two_sample_chi2(*orders)
        if chi2 > CHI2_23_MAX:
            failures.append(f"view {view} jitter order: chi2={chi2:.1f} > {CHI2_23_MAX}")
        for name in ("jitter", "grayscale", "gray_measured", "blur", "solarize", "flip"):
            failures += mean_check(f"view {view} {name} rate", d[name].astype(float), r[name].astype(float))
        for stat in ("channel_mean", "channel_std"):
            for c in range(3):
                failures += mean_check(f"view {view} {stat}[{c}]", d[stat][:, c], r[stat][:, c])
    return failures


def _two_sample_chi2(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square statistic of two histograms drawn from one distribution (df = bins - 1)."""
    na, nb = a.sum(), b.sum()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    return float(((np.sqrt(nb / na) * a - np.sqrt(na / nb) * b) ** 2 / (a + b)).sum())


@pytest.fixture(scope="module")
def torch_reference(files):
    return torch_samples(files)


def test_dali_and_torchvision_views_are_statistically_equivalent(files, torch_reference):
    dali = dali_samples(files)
    assert compare(dali, torch_reference) == []
    # the measured grayscale is the sampled one (the choice reaches the pixels), in both backends
    for records in (dali, torch_reference):
        for view in records:
            assert np.array_equal(view["gray_measured"], view["grayscale"])


def test_a_mis_set_probability_fails(files, torch_reference):
    mis_set = tuple(D.ViewAugment(v.blur_p, v.solarize_p, grayscale_p=0.4) for v in D.PAPER_VIEWS)
    failures = compare(dali_samples(files, views=mis_set), torch_reference)
    assert {f.split(":")[0] for f in failures} >= {f"view {v} {name} rate" for v in (1, 2)
                                                   for name in ("grayscale", "gray_measured")}


def test_the_checks_pass_between_two_seeds_of_torchvision(files, torch_reference):
    assert compare(torch_samples(files, seed=12), torch_reference) == []


def test_dali_views_match_torchvision_for_the_same_random_choices(files):
    """Each DALI view equals torchvision's apply_view with DALI's drawn choices, to within the
    resize/blur implementation differences (module docstring of moca_fast.data.dali): mean absolute
    difference <= 1.5 grey levels per image and <= 0.6 on average. Measured on these images, one
    choice inverted costs a median of 17 (hue sign) to 45 (flip) grey levels, and skipping the blur
    3, so a choice that does not reach the pixels fails."""
    c = run_dali(files, pairs=128, batch=64)
    images = [open_rgb(f) for f in files]
    for view in D.VIEW_NAMES:
        errors = []
        for i in range(128):
            params = dali_choices_as_view_params(c, view, i)
            expected = T.to_uint8_tensor(T.apply_view(images[i % len(images)], params, IMG_SIZE)).numpy()
            errors.append(np.abs(unnormalise(c[view][i:i + 1])[0] * 255 - expected).mean())
        assert max(errors) <= 1.5 and np.mean(errors) <= 0.6, (view, max(errors), np.mean(errors))
        assert c[f"{view}_jitter"].any() and c[f"{view}_grayscale"].any() and c[f"{view}_flip"].any()
    assert c["view1_blur"].all() and c["view2_solarize"].any()
