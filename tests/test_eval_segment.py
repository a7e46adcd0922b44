"""python -m moca_fast.eval segment end to end on a small folder-layout set (tiny preset, a few iterations):
the result JSON, its settings and scores; the quick cached mode, fine-tuning, low-shot; the examples file and
`python -m moca_fast.viz segment`; bad input in one line with exit status 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eval_data import make_run
from moca_fast.eval import segment
from moca_fast.probes.segmentation_examples import read_examples
from moca_fast.viz import segment as viz_segment

COMMON = ["--num-workers", "0", "--iters", "3", "--batch-size", "2", "--val-images", "2"]


def _write_set(root, ignore_rows: int = 5, outside: bool = True):
    """classes.txt (3 classes); train: 4 pairs of 80 x 70, val: 3 pairs; the top ignore_rows rows of every mask
    255; with `outside`, 800 pixels of val mask 1 hold label 9 (no class)."""
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 255, (70, 80, 3), np.uint8)).save(root / split / "images" / f"{k}.png")
            mask = rng.integers(0, 3, (70, 80), np.uint8)
            mask[:ignore_rows] = 255
            if outside and split == "val" and k == 1:
                mask[10:20] = 9
            Image.fromarray(mask).save(root / split / "masks" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_set(tmp_path_factory.mktemp("segset"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("segrun") / "run")


def _segment(capsys, *argv):
    status = segment.main(list(argv))
    return status, capsys.readouterr()


def test_linear_probe_writes_scores_settings_and_examples(data, run, tmp_path, capsys):
    out = tmp_path / "seg.json"
    status, cap = _segment(capsys, "--checkpoint", str(run), "--data", str(data), "--output", str(out),
                           "--examples", "2", "--val-images", "3", *COMMON[:-2])
    assert status == 0, cap.err
    result = json.loads(out.read_text())
    assert result["protocol"] == "segment" and result["settings"]["layout"] == "folder"
    assert result["settings"]["window"] == 64 and result["settings"]["stride"] == 42
    assert result["settings"]["iters"] == 3 and result["settings"]["features"] == "last"
    assert set(result["iou"]) == {"sky", "road", "car"} and 0 <= result["miou"] <= 100
    assert result["results"]["teacher"]["full"]["runs"][0]["pixels"] == 3 * 65 * 80 - 10 * 80
    assert result["ignored_masks"]["val"]["count"] == 1 and "1.png" in result["ignored_masks"]["val"]["first"][0]
    assert "random_init" not in result["results"]
    assert result["images_per_s"]["train"] > 0 and "mIoU" in cap.out
    meta, items = read_examples(result["examples"])
    assert meta["count"] == 2 and items[0][0].shape == (70, 80, 3) and items[0][2].shape == (70, 80)
    assert meta["classes"] == ["sky", "road", "car"]
    png = tmp_path / "seg.png"
    assert viz_segment.main([str(out), "--output", str(png)]) == 0
    assert Image.open(png).size[0] > 500


def test_cached_last4_with_random_init_beside_it(data, run, tmp_path, capsys):
    out = tmp_path / "cached.json"
    status, cap = _segment(capsys, "--checkpoint", str(run), "--data", str(data), "--output", str(out),
                           "--cached", "--features", "last4", "--random-init", "--examples", "0", *COMMON)
    assert status == 0, cap.err
    result = json.loads(out.read_text())
    assert result["settings"]["cached"] and result["settings"]["head"] == "batchnorm + 1x1 conv"
    assert set(result["results"]) == {"teacher", "random_init"} and "examples" not in result


def test_finetune_and_low_shot_report_each_split(data, run, tmp_path, capsys):
    out = tmp_path / "ft.json"
    status, cap = _segment(capsys, "--checkpoint", str(run), "--data", str(data), "--output", str(out),
                           "--finetune", "--shots", "1", "2", "--splits", "2", "--examples", "0", *COMMON)
    assert status == 0, cap.err
    result = json.loads(out.read_text())
    assert result["settings"]["protocol"] == "finetune" and result["settings"]["layer_decay"] == 0.65
    shots = result["results"]["teacher"]
    assert set(shots) == {"1-shot", "2-shot"}
    assert [r["train_images"] for r in shots["2-shot"]["runs"]] == [2, 2]
    mious = [r["miou"] for r in shots["1-shot"]["runs"]]
    assert shots["1-shot"]["miou_mean"] == pytest.approx(np.mean(mious))
    assert shots["1-shot"]["miou_std"] == pytest.approx(np.std(mious))
    assert "±" in cap.out


@pytest.mark.parametrize("extra, message", [
    (["--data", "MISSING"], "no such folder"),
    (["--cached", "--finetune"], "cannot be combined"),
    (["--shots", "9"], "only 4 images"),
    (["--iters", "0"], "--iters 0 must be >= 1"),
    (["--layout", "voc"], "ImageSets/Segmentation/train.txt"),
])
def test_bad_input_is_one_line_with_status_2(data, run, tmp_path, capsys, extra, message):
    args = ["--checkpoint", str(run), "--data", str(data), "--output", str(tmp_path / "x.json"), *COMMON]
    if extra[0] == "--data":
        args[3] = str(tmp_path / "missing")
        extra = []
    status, cap = _segment(capsys, *args, *extra)
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("error:")]
    assert status == 2 and len(lines) == 1 and message in lines[0], cap.err
    assert "Traceback" not in cap.err and not (tmp_path / "x.json").exists()


def test_an_unwritable_output_is_refused_before_any_work(data, run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status, cap = _segment(capsys, "--checkpoint", str(run), "--data", str(data), "--output",
                           str(tmp_path / "file" / "x.json"), *COMMON)
    assert status == 2 and "--output" in cap.err and "training" not in cap.err


def test_viz_refuses_a_file_that_is_not_an_examples_file(tmp_path, capsys):
    bad = tmp_path / "bad_examples.npz"
    bad.write_bytes(b"nonsense")
    assert viz_segment.main([str(bad), "--output", str(tmp_path / "x.png")]) == 2
    assert "not a segmentation examples file" in capsys.readouterr().err


def test_two_gloo_ranks_score_every_image_once_and_match_one_rank(run, tmp_path, capsys):
    """--cached, `last` (no BatchNorm): two ranks of batch 2 see the one-rank batch of 4 split between them (the
    same draws), DDP averages their gradients, so the head and its scores are those of one rank. Exactly so only
    where no pixel is ignored: each rank's loss is the mean over its own labelled pixels."""
    (tmp_path / "set").mkdir()
    data = _write_set(tmp_path / "set", ignore_rows=0, outside=False)
    common = ["--checkpoint", str(run), "--data", str(data), "--cached", "--num-workers", "0", "--iters", "3",
              "--examples", "0"]
    one = tmp_path / "one.json"
    status, cap = _segment(capsys, *common, "--batch-size", "4", "--output", str(one))
    assert status == 0, cap.err
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "moca_fast.eval", "segment", *common, "--batch-size", "2", "--output", str(two)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    runs = [r["results"]["teacher"]["full"]["runs"][0] for r in (a, b)]
    assert runs[1]["pixels"] == 3 * 70 * 80 == runs[0]["pixels"]
    assert runs[1]["iou"] == runs[0]["iou"] and b["settings"]["batch_size"] == 4
