"""Segmentation readers: each layout on a small tree with the data set's own file names; bad inputs counted
and named, or refused in one line; the demo mosaics; the training crops and the endless batch sampler."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from moca_fast.errors import ConfigError
from moca_fast.data import segmentation_demo
from moca_fast.data.segmentation import (CITYSCAPES_LABEL_IDS, IGNORE, load_segmentation)
from moca_fast.data.segmentation_loader import EndlessBatches, TrainCrops, endless_draws


def _image(path, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).convert(mode).save(path)


def _mask(path, values, size=(20, 12), palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.asarray(values, np.uint8), size[1] * size[0]).reshape(size[1], size[0])
    img = Image.fromarray(arr, "L")
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
        img.frombytes(arr.tobytes())
    img.save(path)


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        _image(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        _mask(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", [7, 26, 0, 33, 1, 3])
    data = load_segmentation(str(tmp_path), "train")
    assert data.layout == "cityscapes" and data.num_classes == 19 and len(data) == 1
    _, labels, problem = data.read(0)
    assert problem is None
    assert labels.ravel()[:6].tolist() == [0, 13, IGNORE, 18, IGNORE, IGNORE]
    assert sorted(CITYSCAPES_LABEL_IDS) == list(CITYSCAPES_LABEL_IDS)


def test_ade20k_label_zero_is_ignored(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for folder in ("training", "validation"):
        _image(base / "images" / folder / f"ADE_{folder[:5]}_00000001.jpg")
        _mask(base / "annotations" / folder / f"ADE_{folder[:5]}_00000001.png", [0, 1, 150, 151])
    data = load_segmentation(str(tmp_path), "val")
    assert data.layout == "ade20k" and data.num_classes == 150
    _, labels, problem = data.read(0)
    assert labels.ravel()[:4].tolist() == [IGNORE, 0, 149, IGNORE]
    assert problem == f"{labels.size // 4} pixels outside the class set"  # 151 is no ADE20K class


def test_voc_palette_masks_and_image_sets(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for name in ("2007_000032", "2007_000039"):
        _image(base / "JPEGImages" / f"{name}.jpg")
        _mask(base / "SegmentationClass" / f"{name}.png", [0, 15, 255, 20], palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n2007_000099\n")
    data = load_segmentation(str(tmp_path), "train")
    assert data.layout == "voc" and data.classes[15] == "person" and len(data) == 2
    assert data.read(1)[1].ravel()[:4].tolist() == [0, 15, IGNORE, 20]
    val = load_segmentation(str(tmp_path), "val")  # 2007_000099 is listed but absent: skipped, counted
    assert len(val) == 1 and val.skipped == {"mask missing": [str(base / "JPEGImages" / "2007_000099.jpg")]}


def _folder_set(root, classes=("sky", "road", "car")):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val"):
        for k in range(2):
            _image(root / split / "images" / f"img{k}.jpg")
            _mask(root / split / "masks" / f"img{k}.png", [0, 1, 2, 255])
    return root


def test_folder_layout_and_its_bad_inputs_are_counted_and_named(tmp_path, caplog):
    root = _folder_set(tmp_path)
    _image(root / "train" / "images" / "nomask.png")
    _image(root / "train" / "images" / "small.png")
    _mask(root / "train" / "masks" / "small.png", [0], size=(10, 12))
    _image(root / "train" / "images" / "rgbmask.png")
    _image(root / "train" / "masks" / "rgbmask.png")
    (root / "train" / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    _mask(root / "train" / "masks" / "broken.png", [0])
    _image(root / "train" / "images" / "outside.png")
    _mask(root / "train" / "masks" / "outside.png", [0, 7])
    with caplog.at_level(logging.WARNING, "moca_fast.data"):
        data = load_segmentation(str(root), "train")
    assert data.layout == "folder" and data.classes == ["sky", "road", "car"]
    assert [p.rsplit("/", 1)[1] for p in data.images] == ["img0.jpg", "img1.jpg", "outside.png"]
    assert {why: [p.rsplit("/", 1)[1] for p in names] for why, names in data.skipped.items()} == {
        "image unreadable": ["broken.jpg"], "mask missing": ["nomask.png"],
        "mask is not one channel of class indices": ["rgbmask.png"],
        "mask size differs from the image's": ["small.png"]}
    assert "nomask.png" in caplog.text and "small.png" in caplog.text
    _, labels, problem = data.read(2)
    assert problem == f"{labels.size // 2} pixels outside the class set"
    assert set(np.unique(labels)) == {0, IGNORE}
    assert data.read(0)[2] is None


@pytest.mark.parametrize("classes, message", [(("only",), "at least 2"), (("a", "b", "a"), "more than once")])
def test_bad_class_lists_are_refused(tmp_path, classes, message):
    _folder_set(tmp_path, classes)
    with pytest.raises(ConfigError, match=message):
        load_segmentation(str(tmp_path), "train")


def test_unknown_layout_missing_split_and_no_pairs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a segmentation set"):
        load_segmentation(str(tmp_path), "train")
    with pytest.raises(ConfigError, match="no such folder"):
        load_segmentation(str(tmp_path / "absent"), "train")
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    (tmp_path / "gtFine").mkdir()
    with pytest.raises(ConfigError, match="no leftImg8bit/val"):
        load_segmentation(str(tmp_path), "val")
    with pytest.raises(ConfigError, match="no usable train image"):
        load_segmentation(str(tmp_path), "train")


def test_a_pair_that_fails_to_decode_late_is_ignored_not_raised(tmp_path):
    root = _folder_set(tmp_path)
    data = load_segmentation(str(root), "val")
    path = root / "val" / "images" / "img0.jpg"
    path.write_bytes(path.read_bytes()[:200])  # headers intact, data truncated after the scan
    image, labels, problem = data.read(0)
    assert problem.startswith("undecodable") and (labels == IGNORE).all() and image.size == (20, 12)


def test_demo_mosaics_label_boxes_of_digits_and_background(tmp_path, monkeypatch):
    monkeypatch.setattr(segmentation_demo, "COUNTS", {"train": 6, "val": 3})
    root = segmentation_demo.prepare_segmentation_demo(tmp_path / "demo")
    data = load_segmentation(root, "train")
    assert data.classes == [str(d) for d in range(10)] + ["background"] and len(data) == 6
    for i in range(len(data)):
        image, labels, problem = data.read(i)
        assert problem is None and image.size == (56, 56)
        bright = np.asarray(image)[..., 0] >= segmentation_demo.STROKE
        assert (labels[bright] != segmentation_demo.BACKGROUND).all()  # every stroke pixel is in a digit box
    assert segmentation_demo.prepare_segmentation_demo(tmp_path / "demo") == root  # built once


def test_training_crops_are_a_function_of_seed_draw_and_index(tmp_path):
    data = load_segmentation(str(_folder_set(tmp_path)), "train")
    crops = TrainCrops(data, window=16, base=None, seed=3)
    x, y, i, problem = crops[(1, 5)]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16) and i == 1 and problem == ""
    again = crops[(1, 5)]
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert any(not torch.equal(crops[(1, d)][0], x) for d in range(6, 12))


def test_endless_batches_split_the_draws_between_ranks():
    draws = endless_draws(5, 4, seed=0)
    first = [next(draws) for _ in range(5)]
    assert sorted(sum(first, [])) == sorted(list(range(5)) * 4)  # 4 whole passes
    ranks = [iter(EndlessBatches([10, 11, 12], batch_size=2, seed=1, rank=r, world=2)) for r in range(2)]
    steps = [[next(it) for it in ranks] for _ in range(3)]
    for step in steps:
        items = step[0] + step[1]
        assert len(items) == 4 and len({d for _, d in items}) == 4 and {i for i, _ in items} <= {10, 11, 12}
