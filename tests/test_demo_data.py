"""The embedded MNIST demo set: written once, atomically, with the right counts, labels and pixels."""
import os

import numpy as np
import pytest
from PIL import Image

from moca_fast.data import demo, scan_images
from moca_fast.data.demo import load_mnist_5k, prepare_demo


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "demo"
    return folder, prepare_demo(folder)


def test_counts_classes_and_split(written):
    folder, data = written
    assert data.train == data.knn_train == str(folder / "train") and data.knn_val == str(folder / "val")
    train, val = scan_images(data.train), scan_images(data.knn_val)
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train) == 4000 and len(val) == 1000 and train.skipped == val.skipped == []
    assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(val.labels).tolist() == [100] * 10
    rows = lambda images: {int(os.path.basename(f)[:-4]) for f in images.files}  # noqa: E731
    assert not rows(train) & rows(val) and len(rows(train) | rows(val)) == 5000


def test_jpegs_hold_the_csv_digits(written):
    _, data = written
    pixels, labels = load_mnist_5k()
    assert pixels.shape == (5000, 28, 28) and pixels.max() == 255
    for row in (0, 1234, 4999, 4):  # row 4 is the 5th image of digit 0: held out
        split = data.knn_val if row % 500 % 5 == 4 else data.train
        img = Image.open(os.path.join(split, str(labels[row]), f"{row:05d}.jpg"))
        assert img.format == "JPEG" and img.size == (28, 28)
        error = np.abs(np.asarray(img.convert("L"), dtype=int) - pixels[row])
        # JPEG quality 95 on MNIST: measured mean <= 0.91 and max <= 9 grey levels over the set
        assert error.mean() <= 2.0 and error.max() <= 16


def test_second_call_returns_without_writing(written, monkeypatch):
    folder, data = written
    monkeypatch.setattr(demo, "_write", lambda _: pytest.fail("the demo set was written again"))
    assert prepare_demo(folder) == data


def test_default_folder_follows_moca_fast_cache(tmp_path, monkeypatch, written):
    _, data = written
    monkeypatch.setenv("MOCA_FAST_CACHE", str(tmp_path))
    os.symlink(os.path.dirname(data.train), tmp_path / "demo_mnist")
    assert prepare_demo().train == str(tmp_path / "demo_mnist" / "train")


def test_an_interrupted_first_run_leaves_nothing_behind(tmp_path, monkeypatch):
    saved = []
    real_save = Image.Image.save

    def save_then_fail(self, *args, **kwargs):
        if len(saved) == 10:
            raise KeyboardInterrupt
        saved.append(args[0])
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo(tmp_path / "demo")
    assert len(saved) == 10 and os.listdir(tmp_path) == []
