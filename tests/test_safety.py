"""Issue 12, in one process (tiny preset, synthetic data, a real DeepSpeed engine on gloo): crafted
checkpoint files never run code, a resume with changed settings is refused before anything loads,
two runs cannot share a run folder, non-finite weights are never saved, disk full is one line."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moca_fast.config import load_config
from moca_fast.errors import ConfigError
from moca_fast.io import checkpoints
from moca_fast.io.safe_load import CheckpointLoadError
from tmpfs import mounted_tmpfs

REPO = Path(__file__).resolve().parents[1]



def _cfg(output, **overrides):
    return load_config("tiny", None, {"data_backend": "synthetic", "output": str(output), "max_steps": 2,
                                      "log_every": 1, "ckpt_every": 1, "num_workers": 0, **overrides})


def _train(cfg, resume=None):
    from moca_fast.train.loop import Trainer

    return Trainer(cfg, resume).train()


@pytest.fixture(scope="module")
def run(one_process_group, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("safety") / "run"
    _train(_cfg(out))
    return out


def _copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


class WritesAMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(folder: Path, relative: str, marker: Path) -> Path:
    """Adds a payload to one file of a checkpoint and re-records the digests (as an attacker would)."""
    path = folder / relative
    content = torch.load(path, map_location="cpu", weights_only=False)  # our own file: safe to read
    content["payload"] = WritesAMarker(marker)
    torch.save(content, path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = checkpoints.file_digests(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    return path


PLANTED = {"trainer": "trainer_rank00000.pt", "model": "deepspeed/mp_rank_00_model_states.pt",
           "optimiser": "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_a_pickle_payload_in_any_checkpoint_file_is_refused_on_resume(run, tmp_path, kind):
    out, marker = _copy(run, tmp_path), tmp_path / "marker"
    planted = _plant(checkpoints.latest_checkpoint(out), PLANTED[kind], marker)
    with pytest.raises(CheckpointLoadError) as refused:
        _train(_cfg(out, max_steps=3), resume="auto")
    assert not marker.exists(), "the payload ran"
    assert str(refused.value).startswith(f"{planted}: refused to load io.open"), refused.value
    assert "\n" not in str(refused.value)


def test_a_payload_is_refused_by_knn_and_export(run, tmp_path, capsys):
    from moca_fast.eval import knn
    from moca_fast.io.__main__ import main as io_main

    out, marker = _copy(run, tmp_path), tmp_path / "marker"
    planted = _plant(checkpoints.latest_checkpoint(out), PLANTED["model"], marker)
    with pytest.raises(CheckpointLoadError, match="refused to load io.open"):
        checkpoints.load_trained_model(str(out))
    assert knn.main(["--checkpoint", str(out)]) == 2
    assert io_main(["export", str(out), "--out", str(tmp_path / "t.pth")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # log lines may come before
    assert "Traceback" not in err and len(lines) == 2 and all(
        line.startswith(f"error: {planted}: refused to load io.open") for line in lines), lines
    assert not marker.exists() and not (tmp_path / "t.pth").exists()


def test_the_clean_checkpoint_loads_weights_only(run):
    model, cfg, folder = checkpoints.load_trained_model(str(run))
    assert folder.name == "step_00000002" and cfg.embed_dim == model.config.embed_dim


def test_auto_resume_skips_a_truncated_newest_checkpoint_of_a_real_run(run, tmp_path, capfd):
    out = _copy(run, tmp_path)
    optimiser = out / "checkpoints" / "step_00000002" / PLANTED["optimiser"]
    optimiser.write_bytes(optimiser.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="damaged checkpoint .*zero_pp_rank_0_mp_rank_00_optim_states.pt has 1000 bytes"):
        _train(_cfg(out, max_steps=3), resume=str(out / "checkpoints" / "step_00000002"))
    capfd.readouterr()
    assert _train(_cfg(out, max_steps=3), resume="auto")["step"] == 3
    logged = capfd.readouterr().err
    assert "skipping checkpoint" in logged and f"resumed from {out / 'checkpoints' / 'step_00000001'} at step 1" in logged


def test_changed_settings_on_resume_are_refused_before_anything_loads(run, tmp_path, capfd):
    out = _copy(run, tmp_path)
    with pytest.raises(ConfigError) as refused:
        _train(_cfg(out, max_steps=3, embed_dim=64, num_words=128, batch_size=8), resume="auto")
    message = str(refused.value)
    for field in ("batch_size 4 -> 8", "embed_dim 32 -> 64", "num_words 64 -> 128"):
        assert field in message, message
    assert "max_steps" not in message and "\n" not in message
    capfd.readouterr()
    assert _train(_cfg(out, max_steps=3, log_every=2), resume="auto")["step"] == 3
    logged = capfd.readouterr().err
    assert "resuming with max_steps 2 -> 3 (the run stops at the new step)" in logged
    assert "resuming with log_every 1 -> 2" in logged


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(one_process_group, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from moca_fast.train.run_guard import RunLock; "
                               "lock = RunLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"^{out} is in use by another run \\(pid {holder.pid}\\)"):
            _train(_cfg(out))
    finally:
        holder.communicate("")
    assert _train(_cfg(out, max_steps=1))["step"] == 1, "the folder is free once the holder has ended"


def _launch(argv) -> int:
    """launch/train.py's main in this process (its exit status)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:  # main ends the process group on success; this module keeps it
        mp.setattr(torch.distributed, "destroy_process_group", lambda: None)
        return module.main(["--preset", "tiny", "--data-backend", "synthetic", "log_every=1", "num_workers=0"]
                           + argv)


def _finite_checkpoints(out: Path) -> list[int]:
    steps = []
    for folder in sorted((out / "checkpoints").glob("step_*")):
        state = checkpoints.load_model_state(folder)
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), folder
        steps.append(int(folder.name.split("_")[1]))
    return steps


def test_a_huge_blr_stops_with_status_3_not_a_traceback(one_process_group, tmp_path, capfd):
    out = tmp_path / "run"
    assert _launch(["--output", str(out), "--max-steps", "3", "ckpt_every=1", "blr=1e36"]) == 3
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: the loss became non-finite") and "stopping without saving" in err[-1], err[-1]
    assert _finite_checkpoints(out) == [1, 2]


def test_non_finite_weights_with_a_finite_loss_are_never_saved(one_process_group, tmp_path, capfd, monkeypatch):
    from moca_fast.train import loop

    real_step = loop.train_step

    def step_then_poison_a_weight(engine, *args):
        terms = real_step(engine, *args)
        with torch.no_grad():
            next(engine.module.parameters()).view(-1)[0] = float("nan")  # as after an overflowing update
        return terms

    monkeypatch.setattr(loop, "train_step", step_then_poison_a_weight)
    out = tmp_path / "run"
    assert _launch(["--output", str(out), "--max-steps", "2", "ckpt_every=1"]) == 3
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 1 of ") and "weight tensors are non-finite at step 1" in err[-1], err[-1]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1], \
        "the loss of step 1 was finite"
    assert _finite_checkpoints(out) == [], "nothing is saved"


def _torch_save_fails_on_a_full_disk(monkeypatch, after_bytes: int):
    """torch.save writes `after_bytes` of the file, then fails as its C++ writer does on ENOSPC
    (a RuntimeError without errno), while statvfs reports the filesystem full."""
    real_save, real_statvfs = torch.save, os.statvfs

    def save(obj, path, *args, **kwargs):
        if "trainer_rank" in str(path):
            Path(path).write_bytes(b"\0" * after_bytes)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    def statvfs(path):
        fs = real_statvfs(path)
        return os.statvfs_result((fs.f_bsize, fs.f_frsize, fs.f_blocks, 0, 0) + tuple(fs)[5:])

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "statvfs", statvfs)


def test_disk_full_while_writing_a_checkpoint_is_one_line_with_status_4(run, tmp_path, capfd, monkeypatch):
    out = _copy(run, tmp_path)
    _torch_save_fails_on_a_full_disk(monkeypatch, 512)
    assert _launch(["--output", str(out), "--max-steps", "3", "--resume", "auto"]) == 4
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: no space left on /") and "writing " + str(out / "checkpoints" / "step_00000003") \
        in err[-1] and err[-1].endswith("; step 2 is the last complete checkpoint"), err[-1]
    assert not list((out / "checkpoints").glob(".*")), "the temporary folder is removed"
    assert checkpoints.resolve_resume("auto", out).name == "step_00000002"


def test_a_resume_while_the_disk_is_still_full_is_one_line(run, tmp_path, capfd, monkeypatch):
    out = _copy(run, tmp_path)
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.parent == out or self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert _launch(["--output", str(out), "--max-steps", "3", "--resume", "auto"]) == 4
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: no space left on /") and err[-1].endswith(
        "; step 2 is the last complete checkpoint"), err[-1]


def test_an_unexpected_error_is_one_line_naming_the_rank_with_the_traceback_in_the_run_folder(
        run, tmp_path, capfd, monkeypatch):
    from moca_fast.train import loop

    out = _copy(run, tmp_path)

    def collective_failed(*args, **kwargs):
        raise RuntimeError("[gloo] Connection closed by peer (rank 1 died)")

    monkeypatch.setattr(loop, "train_step", collective_failed)
    assert _launch(["--output", str(out), "--max-steps", "3", "--resume", "auto"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1] == (f"error: rank 0: RuntimeError: [gloo] Connection closed by peer (rank 1 died); step 2 is the "
                       f"last complete checkpoint (traceback in {out / 'error_rank0.log'})"), err[-1]
    assert "collective_failed" in (out / "error_rank0.log").read_text()


def test_steps_deepspeed_skips_are_logged_and_reported_at_the_end(one_process_group, tmp_path, capfd, monkeypatch):
    from moca_fast.train import loop

    real_step = loop.train_step

    def step_counted_as_skipped(engine, *args):  # DeepSpeed's own counter, as on a gradient overflow
        terms = real_step(engine, *args)
        engine.skipped_steps += 1
        return terms

    monkeypatch.setattr(loop, "train_step", step_counted_as_skipped)
    assert _launch(["--output", str(tmp_path / "run"), "--max-steps", "2"]) == 0
    captured = capfd.readouterr()
    assert "DeepSpeed skipped 2 optimiser step(s) so far (gradient overflow)" in captured.err
    assert "note: DeepSpeed skipped 2 optimiser step(s) on gradient overflow" in captured.out


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2.5 MB tmpfs (room for two tiny checkpoints and the run files; not for a third), if this process may
    mount one."""
    with mounted_tmpfs(tmp_path / "full", "size=2500k",
                       "mounting a tmpfs needs root (the injected-ENOSPC tests above still run)") as mount:
        yield mount


def test_a_real_full_filesystem_stops_with_status_4_and_a_resume_too(one_process_group, tiny_tmpfs, capfd):
    out = tiny_tmpfs / "run"
    args = ["--output", str(out), "--max-steps", "4", "ckpt_every=1"]
    expected = (f"error: no space left on {tiny_tmpfs} writing {out / 'checkpoints' / 'step_00000003'}; "
                f"step 2 is the last complete checkpoint")
    assert _launch(args) == 4
    assert capfd.readouterr().err.strip().splitlines()[-1] == expected
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert _launch(args + ["--resume", "auto"]) == 4, "still full: the same line, not a traceback"
    assert capfd.readouterr().err.strip().splitlines()[-1] == expected
