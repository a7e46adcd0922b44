"""Checkpoint folder logic: atomic publication, `latest`, pruning, resume resolution, RNG capture.

The DeepSpeed engine is replaced by a stub that writes one file (or crashes half-way) to isolate the
atomicity logic; the real engine's save/load is exercised by tests/test_train_e2e.py.
"""
import json
import random

import numpy as np
import pytest
import torch

from moca_fast.errors import ConfigError
from moca_fast.io import checkpoints
from moca_fast.train import checkpoint as ckpt


class StubEngine:
    optimizer = None  # no optimiser state sliced over ranks

    def __init__(self, crash_after_partial_write: bool = False):
        self.crash = crash_after_partial_write

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False
        folder = f"{save_dir}/{tag}"
        import os

        os.makedirs(folder, exist_ok=True)
        with open(f"{folder}/mp_rank_00_model_states.pt", "wb") as f:
            f.write(b"partial" if self.crash else b"complete")
        if self.crash:
            raise OSError("disk full (simulated crash while writing)")


def _save(output, step, engine=None, keep=3):
    trainer_state = {"step": step, "loader": {"epoch": 0, "step": step}}
    return ckpt.save_checkpoint(engine or StubEngine(), output, step, trainer_state, {"world_size": 1, "config": {}}, keep)


def test_save_publishes_a_complete_folder_and_moves_latest(tmp_path):
    first = _save(tmp_path, 1)
    assert checkpoints.latest_checkpoint(tmp_path) == first
    second = _save(tmp_path, 2)
    assert checkpoints.latest_checkpoint(tmp_path) == second
    assert checkpoints.read_meta(second)["step"] == 2
    assert torch.load(ckpt.trainer_file(second, 0), weights_only=False)["step"] == 2
    assert (second / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes() == b"complete"
    assert not list((tmp_path / "checkpoints").glob(".*")), "no temporary files left"


def test_a_crash_while_writing_leaves_latest_on_the_previous_complete_checkpoint(tmp_path):
    good = _save(tmp_path, 5)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 6, StubEngine(crash_after_partial_write=True))
    assert checkpoints.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "checkpoints" / "step_00000006").exists(), "the broken step is never published"
    assert checkpoints.resolve_resume("auto", tmp_path) == good
    retried = _save(tmp_path, 6)  # the next attempt replaces the leftover temporary folder
    assert checkpoints.latest_checkpoint(tmp_path) == retried
    assert (retried / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes() == b"complete"


def test_pruning_keeps_the_newest_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000030", "step_00000040"]


def test_pruning_never_counts_a_damaged_checkpoint(tmp_path):
    _save(tmp_path, 1, keep=2)
    damaged = _save(tmp_path, 2, keep=2)
    _damage_truncate(damaged)
    _save(tmp_path, 3, keep=2)  # a run resumed from step 1 after skipping the damaged step 2... then saved step 3
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000001", "step_00000002", "step_00000003"], "the good step 1 must survive"
    _save(tmp_path, 4, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003", "step_00000004"]


def test_resaving_the_same_step_replaces_it(tmp_path):
    _save(tmp_path, 3)
    again = _save(tmp_path, 3)
    assert checkpoints.latest_checkpoint(tmp_path) == again and checkpoints.read_meta(again)["step"] == 3


def test_resume_resolution(tmp_path):
    assert checkpoints.resolve_resume(None, tmp_path) is None, "fresh start in an empty folder"
    assert checkpoints.resolve_resume("auto", tmp_path) is None, "auto with nothing to resume starts fresh"
    folder = _save(tmp_path, 7)
    with pytest.raises(ConfigError, match="--resume auto"):
        checkpoints.resolve_resume(None, tmp_path)
    assert checkpoints.resolve_resume("auto", tmp_path) == folder
    assert checkpoints.resolve_resume(str(folder), tmp_path / "elsewhere") == folder
    assert checkpoints.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == folder, "a run folder resumes its latest"
    assert checkpoints.resolve_resume(str(tmp_path / "checkpoints"), tmp_path / "elsewhere") == folder
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        checkpoints.resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    assert checkpoints.resolve_resume("auto", tmp_path) == folder, "auto: the newest complete one, whatever latest says"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoints.resolve_resume(str(tmp_path), tmp_path / "elsewhere")


def _damage_truncate(folder):
    model = folder / "deepspeed" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-3])
    return "deepspeed/mp_rank_00_model_states.pt has 5 bytes, 8 were written"


def _damage_delete_deepspeed(folder):
    import shutil

    shutil.rmtree(folder / "deepspeed")
    return "deepspeed/mp_rank_00_model_states.pt is missing"


def _damage_flip_a_byte(folder):
    trainer = ckpt.trainer_file(folder, 0)
    data = bytearray(trainer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    trainer.write_bytes(bytes(data))
    return "trainer_rank00000.pt fails its CRC-32 check"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_delete_deepspeed, _damage_flip_a_byte])
def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, damage, caplog):
    good = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    reason = damage(newest)
    with caplog.at_level("WARNING", logger="moca_fast.train"):
        assert checkpoints.resolve_resume("auto", tmp_path) == good
    assert f"skipping checkpoint {newest}: {reason}" in caplog.text
    with pytest.raises(ConfigError, match=f"--resume {newest}: damaged checkpoint \\({reason}\\)"):
        checkpoints.resolve_resume(str(newest), tmp_path)
    with pytest.raises(ConfigError, match="damaged checkpoint"):
        checkpoints.resolve_resume(str(tmp_path), tmp_path)  # a run folder: its latest, which is damaged
    damage(good)
    with pytest.raises(ConfigError, match="no checkpoint verifies: step_00000002 .*; step_00000001 "):
        checkpoints.resolve_resume("auto", tmp_path)


def test_meta_records_each_file_size_and_crc32(tmp_path):
    import zlib

    folder = _save(tmp_path, 1)
    files = json.loads((folder / "meta.json").read_text())["files"]
    assert set(files) == {"deepspeed/mp_rank_00_model_states.pt", "trainer_rank00000.pt"}
    trainer = ckpt.trainer_file(folder, 0).read_bytes()
    assert files["trainer_rank00000.pt"] == {"size": len(trainer), "crc32": f"{zlib.crc32(trainer):08x}"}


def test_pruning_hides_a_folder_before_deleting_it(tmp_path, monkeypatch):
    import shutil

    for step in (1, 2):
        _save(tmp_path, step, keep=2)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, ignore_errors=False):
        if ".deleting" in str(path) and (tmp_path / "checkpoints" / ".step_00000001.deleting").exists():
            raise KeyboardInterrupt  # the process dies half-way through deleting step 1
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, keep=2)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003"], "the half-deleted step 1 no longer looks like a checkpoint"
    assert checkpoints.resolve_resume("auto", tmp_path).name == "step_00000003"


def test_meta_is_json_with_world_size(tmp_path):
    folder = _save(tmp_path, 1)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 1


def test_rng_capture_and_restore_replays_every_generator():
    state = ckpt.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_a_resumed_run_drops_the_metrics_records_it_will_log_again(tmp_path):
    from moca_fast.train.run_log import _drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    _drop_records_after(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
