"""Issue 19: a resume is exact or refused. The checkpoint records what identifies its data (images per class and
fingerprints of the file list); a resume on other data is refused in one line that says what changed, unless
resume_data_change=continue, which logs how the epoch, the schedules and the data order change. In one process
(tiny preset, a real DeepSpeed engine on gloo, a small folder of real JPEGs); the fingerprint's units."""
import shutil

import pytest

from moca_fast.errors import ConfigError
from jpeg_folder import write_class_folders
from test_safety import _cfg, _train

PATHS = ["a/1.jpg", "a/2.jpg", "b/1.jpg"]


def test_the_fingerprint_depends_on_every_path_its_order_and_the_labels():
    from moca_fast.data.fingerprint import file_list_fingerprint

    base = file_list_fingerprint(PATHS, [0, 0, 1])
    assert file_list_fingerprint(list(PATHS), [0, 0, 1]) == base
    assert file_list_fingerprint(["a/1.jpg", "a/3.jpg", "b/1.jpg"], [0, 0, 1]) != base
    assert file_list_fingerprint(PATHS[::-1], [1, 0, 0]) != base
    assert file_list_fingerprint(PATHS, [0, 1, 1]) != base
    assert file_list_fingerprint(["caf\udce9.jpg"]) != file_list_fingerprint(["cafe.jpg"])  # undecodable names hash


def test_a_change_is_described_class_by_class():
    from moca_fast.data.fingerprint import data_identity, describe_data_change

    old = data_identity(PATHS, [0, 0, 1], ["a", "b"])
    assert describe_data_change(old, data_identity(PATHS, [0, 0, 1], ["a", "b"])) is None
    grown = data_identity(PATHS + ["a/3.jpg", "c/1.jpg"], [0, 0, 1, 0, 2], ["a", "b", "c"])
    assert describe_data_change(old, grown) == "3 -> 5 images: a 2 -> 3 images (+1), class c added (1 images)"
    renamed = data_identity(["a/1.jpg", "a/9.jpg", "b/1.jpg"], [0, 0, 1], ["a", "b"])
    assert describe_data_change(old, renamed) == \
        "3 -> 3 images: a other files (2 images, some added and as many removed)"
    relabelled = data_identity(PATHS, [0, 1, 1], ["a", "b"])
    assert "a 2 -> 1 images (-1)" in describe_data_change(old, relabelled)


@pytest.fixture
def jpegs(tmp_path):
    return write_class_folders(tmp_path / "jpegs", per_class=12, classes=2)  # 24 images: 6 batches of 4


def _on(jpegs, out, **overrides):
    return _cfg(out, data=str(jpegs), data_backend="torch", **overrides)


def test_a_resume_on_changed_data_is_refused_in_one_line_or_continued_with_the_changes_logged(
        one_process_group, jpegs, tmp_path, capfd):
    out = tmp_path / "run"
    assert _train(_on(jpegs, out))["step"] == 2
    for i in range(4):  # 28 images: 7 batches of 4
        shutil.copy(jpegs / "c0" / "0.jpg", jpegs / "c0" / f"new{i}.jpg")
    with pytest.raises(ConfigError) as refused:
        _train(_on(jpegs, out, max_steps=3), resume="auto")
    message = str(refused.value)
    assert message == (f"the data changed since checkpoint {out / 'checkpoints' / 'step_00000002'}: 24 -> 28 images: "
                       f"c0 12 -> 16 images (+4); restore the data, or set resume_data_change=continue to train on the "
                       f"new data (the epoch length, the schedules and the data order change)"), message
    capfd.readouterr()
    assert _train(_on(jpegs, out, max_steps=3, resume_data_change="continue"), resume="auto")["step"] == 3
    logged = capfd.readouterr().err
    assert "continuing on the new data (resume_data_change=continue)" in logged
    assert ("continuing on the new data at step 2: an epoch has 7 optimiser steps instead of 6 (14 steps in the 2 "
            "epochs instead of 12); step 2 is epoch 0.2857 instead of 0.3333, so lr ") in logged, logged
    assert "data order: epoch 0 goes on at its batch 2 of a new permutation of the 28 images" in logged
    (jpegs / "c1" / "5.jpg").rename(jpegs / "c1" / "renamed.jpg")  # same counts, another file list
    with pytest.raises(ConfigError, match=r"28 -> 28 images: c1 other files \(12 images, some added and as many "
                                          r"removed\); restore the data"):
        _train(_on(jpegs, out, max_steps=4), resume="auto")
