"""Bad input to the evaluation commands: one line naming the file or setting, exit status 2, no traceback."""
import shutil
import subprocess
import sys

import pytest
import torch

from eval_data import REPO, make_eval_data, make_run
from moca_fast.eval import knn, lowshot
from moca_fast.io import export_teacher_timm

GOLDEN_OFFICIAL = REPO / "tests" / "golden" / "tiny_official_checkpoint.pth"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_eval")
    return make_run(root / "run"), make_eval_data(root / "data", per_class_train=2, per_class_val=1), root


def _one_line_error(capsys, argv, main=knn.main):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def _copy(data, tmp_path):
    return shutil.copytree(data, tmp_path / "data")


def test_missing_split_folder(setup, tmp_path, capsys):
    run, data, _ = setup
    copy = _copy(data, tmp_path)
    shutil.rmtree(copy / "val")
    line = _one_line_error(capsys, ["--checkpoint", str(run), "--data", str(copy)])
    assert f"{copy / 'val'}" in line and "does not exist" in line


def test_class_in_val_but_not_in_train(setup, tmp_path, capsys):
    run, data, _ = setup
    copy = _copy(data, tmp_path)
    shutil.copytree(copy / "val" / "c0", copy / "val" / "zebra")
    line = _one_line_error(capsys, ["--checkpoint", str(run), "--data", str(copy)])
    assert "'zebra'" in line and str(copy / "train") in line


def test_empty_class_folder(setup, tmp_path, capsys):
    run, data, _ = setup
    copy = _copy(data, tmp_path)
    (copy / "train" / "empty_class").mkdir()
    line = _one_line_error(capsys, ["--checkpoint", str(run), "--data", str(copy)])
    assert str(copy / "train" / "empty_class") in line and "no usable image" in line


def test_checkpoint_of_another_architecture(setup, tmp_path, capsys):
    run, data, root = setup
    line = _one_line_error(capsys, ["--checkpoint", str(GOLDEN_OFFICIAL), "--preset", "demo", "--data", str(data)])
    assert str(GOLDEN_OFFICIAL) in line and "shape mismatch" in line
    from eval_data import tiny_model

    export = tmp_path / "teacher.pth"
    export_teacher_timm(tiny_model(), export)
    saved = torch.load(export, weights_only=True)
    saved["timm_kwargs"]["depth"] = 5  # a 5-block architecture, holding 3 blocks' weights
    torch.save(saved, export)
    line = _one_line_error(capsys, ["--checkpoint", str(export), "--data", str(data)])
    assert str(export) in line and "another architecture" in line


def test_subset_naming_missing_images(setup, tmp_path, capsys):
    run, data, _ = setup
    subset = tmp_path / "subset.txt"
    subset.write_text("c0/0.jpg\nc1/nope.jpg\nc2/gone.jpg\n")
    line = _one_line_error(capsys, ["--checkpoint", str(run), "--data", str(data), "--subset", str(subset)],
                           lowshot.main)
    assert str(subset) in line and "c1/nope.jpg" in line and "2 of 3" in line


@pytest.mark.parametrize("argv, named", [(["knn", "--bogus", "1"], "--bogus"), (["kmeans"], "'kmeans'")])
def test_unknown_option_or_protocol(argv, named):
    proc = subprocess.run([sys.executable, "-m", "moca_fast.eval", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr


def test_bad_protocol_setting_in_process(capsys):
    from moca_fast.eval import linear

    with pytest.raises(SystemExit) as stop:
        linear.main(["--features", "cls"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--features" in err[0]
