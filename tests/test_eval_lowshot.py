"""Low-shot logistic regression: the CLI's scores equal scikit-learn on features computed here; subset
files (official bare names and relative paths); drawn N-shot subsets."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from eval_data import make_run, tiny_cfg, tiny_model
from jpeg_folder import write_class_folders
from moca_fast.data import build_eval_loader, scan_images
from moca_fast.eval import lowshot


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ImageNet-like names: train/n0k/n0k_i.JPEG (so official subset lines resolve), val/n0k/i.jpg."""
    root = tmp_path_factory.mktemp("lowshot")
    classes = ["n01", "n02", "n03"]
    write_class_folders(root / "tmp", per_class=6, classes=3, seed=1)
    for k, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for f in sorted((root / "tmp" / f"c{k}").iterdir()):
            f.rename(root / "train" / name / f"{name}_{f.stem}.JPEG")
    write_class_folders(root / "val", per_class=3, classes=3, seed=2)
    for k, name in enumerate(classes):
        (root / "val" / f"c{k}").rename(root / "val" / name)
    return root


def _prenorm_features(model, folder, keep=None):
    """Patch average of the teacher's tokens before the final LayerNorm (blocks run by hand), centred per
    image, L2-normalised."""
    images = scan_images(folder)
    t, out, labels = model.teacher, [], []
    with torch.no_grad():
        for x, y, _ in build_eval_loader(images, tiny_cfg(), batch_size=7):
            h = t.patch_embed(x) + t.pos_embed[:, 1:]
            h = torch.cat([(t.cls_token + t.pos_embed[:, :1]).expand(len(x), -1, -1), h], dim=1)
            for blk in t.blocks:
                h = blk(h)
            avg = h[:, 1:].mean(1)
            out.append(F.normalize(avg - avg.mean(1, keepdim=True), dim=1))
            labels.append(y)
    return images, torch.cat(out).numpy(), torch.cat(labels).numpy()


def test_cli_scores_equal_scikit_learn_on_the_same_features(data, tmp_path):
    run = make_run(tmp_path / "run")
    official = tmp_path / "2imgs_class.txt"  # official format: bare names, class = prefix before "_"
    official.write_text("n01_0.JPEG\nn01_3.JPEG\nn02_1.JPEG\nn02_5.JPEG\nn03_2.JPEG\nn03_4.JPEG\n")
    relative = tmp_path / "rel.txt"  # paths relative to the train folder
    relative.write_text("n01/n01_1.JPEG\nn02/n02_2.JPEG\nn03/n03_0.JPEG\n")
    out = tmp_path / "lowshot.json"
    assert lowshot.main(["--checkpoint", str(run), "--data", str(data), "--subset", str(official), "--subset",
                         str(relative), "--shots", "1", "--splits", "2", "--output", str(out),
                         "--num-workers", "0"]) == 0
    result = json.loads(out.read_text())

    images, x, y = _prenorm_features(tiny_model(), data / "train")
    _, val_x, val_y = _prenorm_features(tiny_model(), data / "val")
    by_name = {Path(f).name: i for i, f in enumerate(images.files)}

    def sklearn_top1(names):
        rows = [by_name[n] for n in names]
        clf = LogisticRegression(C=1 / 0.1, fit_intercept=False, solver="lbfgs", tol=1e-4, max_iter=300)
        clf.fit(x[rows], y[rows])
        return 100.0 * clf.score(val_x, val_y)

    groups = {r["name"]: r for r in result["results"]}
    assert set(groups) == {"1-shot", "2imgs_class", "rel"}
    assert groups["2imgs_class"]["splits"][0]["top1"] == pytest.approx(
        sklearn_top1(official.read_text().split()), abs=1e-9)
    assert groups["rel"]["splits"][0]["top1"] == pytest.approx(
        sklearn_top1([line.split("/")[1] for line in relative.read_text().split()]), abs=1e-9)
    drawn = lowshot.draw_subsets(images.labels, images.classes, [1], 2, seed=0)[1]
    tops = [sklearn_top1([Path(images.files[i]).name for i in split]) for split in drawn]
    assert groups["1-shot"]["mean"] == pytest.approx(np.mean(tops)) and groups["1-shot"]["std"] == pytest.approx(np.std(tops))
    assert result["top1"] == groups["1-shot"]["mean"] and result["protocol"] == "lowshot"


def test_drawn_subsets_are_nested_per_class_and_seeded():
    labels = [c for c in range(4) for _ in range(7)]
    classes = ["a", "b", "c", "d"]
    subsets = lowshot.draw_subsets(labels, classes, [1, 2, 5], 3, seed=4)
    assert subsets == lowshot.draw_subsets(labels, classes, [1, 2, 5], 3, seed=4)
    for s in range(3):
        for n in (1, 2, 5):
            assert sorted(np.bincount([labels[i] for i in subsets[n][s]]).tolist()) == [n] * 4
        assert set(subsets[1][s]) <= set(subsets[2][s]) <= set(subsets[5][s])
    assert subsets[1][0] != subsets[1][1] or subsets[1][1] != subsets[1][2]
