"""Issue 19, the evaluation and io commands check before they work and never lose a result: outputs are checked
for writability before any work (a folder, a read-only filesystem, a parent that is a file); a result that cannot
be written at the end is kept elsewhere and no temporary file is left; a one-class subset or data set, a --preset
that disagrees with the checkpoint, and export metadata that disagrees with its weights or is malformed are one
line each with exit status 2."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from eval_data import make_eval_data, make_run, tiny_model
from tmpfs import mounted_tmpfs
from moca_fast.eval import cli, knn, lowshot
from moca_fast.io import export_teacher_timm
from moca_fast.io.__main__ import main as io_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_checks")
    return make_run(root / "run"), make_eval_data(root / "data", per_class_train=2, per_class_val=1)


def _one_line_error(capsys, main, argv) -> str:
    """main(argv) exits 2 with one `error:` line, the last on stderr (log lines may precede it), and no
    traceback; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and [line for line in err if line.startswith("error: ")] == err[-1:], err
    return err[-1]


@pytest.fixture
def no_work(monkeypatch):
    """Loading the teacher (the first piece of work) fails the test."""
    def work_started(*args, **kwargs):
        raise AssertionError("the evaluation started before its output was checked")

    monkeypatch.setattr(cli, "load_teacher", work_started)


@pytest.fixture
def read_only_folder(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m",
                       "mounting a read-only tmpfs needs root (the other unwritable outputs are tested above)") as mount:
        yield mount


def test_an_output_folder_or_a_parent_that_is_a_file_is_refused_before_any_work(setup, tmp_path, capsys, no_work):
    run, data = setup
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, named in [(tmp_path, f"--output {tmp_path} is a folder, not a file"),
                          (a_file / "knn.json", f"--output {a_file / 'knn.json'} cannot be created: {a_file} is a file")]:
        line = _one_line_error(capsys, knn.main, ["--checkpoint", str(run), "--data", str(data), "--output",
                                                  str(output)])
        assert line == f"error: {named}", line
    line = _one_line_error(capsys, io_main, ["export", str(run), "--out", str(tmp_path)])
    assert line == f"error: --out {tmp_path} is a folder, not a file", line


def test_a_read_only_filesystem_is_found_before_any_work(setup, read_only_folder, tmp_path, capsys, no_work):
    from moca_fast.eval import finetune

    run, data = setup
    out = read_only_folder / "knn.json"
    line = _one_line_error(capsys, knn.main, ["--checkpoint", str(run), "--data", str(data), "--output", str(out)])
    assert line == f"error: --output {out} cannot be written: {read_only_folder}: Read-only file system", line
    save_dir = read_only_folder / "ckpts"
    line = _one_line_error(capsys, finetune.main, ["--checkpoint", str(run), "--data", str(data), "--output",
                                                   str(tmp_path / "ft.json"), "--save-dir", str(save_dir)])
    assert line == f"error: --save-dir {save_dir} cannot be written: {read_only_folder}: Read-only file system", line
    line = _one_line_error(capsys, io_main, ["export", str(run), "--out", str(read_only_folder / "t.pth")])
    assert "cannot be written" in line and "Read-only file system" in line, line


def test_the_trainer_finds_a_read_only_output_before_it_starts(read_only_folder):
    from moca_fast.config import load_config
    from moca_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=f"output={read_only_folder / 'run'} cannot be written: "
                                          f"{read_only_folder}: Read-only file system"):
        load_config("tiny", overrides={"output": str(read_only_folder / "run")}).check_paths()


def test_a_result_that_cannot_be_written_is_kept_elsewhere_and_leaves_no_temporary_file(
        setup, tmp_path, capsys, monkeypatch):
    run, data = setup
    out = tmp_path / "results" / "knn.json"
    real_write_text = Path.write_text

    def disk_fills_up(self, text, *args, **kwargs):
        if self.parent == out.parent:
            real_write_text(self, text[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    assert knn.main(["--checkpoint", str(run), "--data", str(data), "--output", str(out), "--num-workers", "0"]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith(f"error: {out} could not be written (No space left on device); the result is in "), error
    kept = Path(error.rsplit(" ", 1)[1])
    assert json.loads(kept.read_text())["protocol"] == "knn" and captured.out.startswith("k-NN: top-1")
    kept.unlink()
    assert list(out.parent.iterdir()) == [], "no result and no temporary file"


def test_a_one_class_subset_or_data_set_is_one_line(setup, tmp_path, capsys):
    run, data = setup
    subset = tmp_path / "one_class.txt"
    subset.write_text("c1/0.jpg\nc1/1.jpg\n")
    line = _one_line_error(capsys, lowshot.main, ["--checkpoint", str(run), "--data", str(data), "--subset",
                                                  str(subset), "--output", str(tmp_path / "l.json")])
    assert line == (f"error: --subset {subset}: all 2 images are of class 'c1'; logistic regression needs at least "
                    f"2 classes"), line
    single = tmp_path / "single"
    for split in ("train", "val"):
        shutil.copytree(data / split / "c0", single / split / "c0")
    line = _one_line_error(capsys, knn.main, ["--checkpoint", str(run), "--data", str(single), "--output",
                                              str(tmp_path / "k.json")])
    assert line == f"error: {single / 'train'} has a single class folder (c0); an evaluation needs at least 2 classes"


def test_a_preset_that_disagrees_with_the_checkpoint_is_one_line(setup, tmp_path, capsys):
    run, data = setup
    line = _one_line_error(capsys, knn.main, ["--checkpoint", str(run), "--preset", "demo", "--data", str(data),
                                              "--output", str(tmp_path / "k.json")])
    assert line.startswith(f"error: --preset demo disagrees with --checkpoint {run} (img_size 28 vs 64, ") and \
        line.endswith("the checkpoint records its architecture: leave out --preset"), line
    line = _one_line_error(capsys, io_main, ["export", str(run), "--preset", "demo", "--out", str(tmp_path / "t.pth")])
    assert line.startswith(f"error: --preset demo disagrees with {run} (img_size 28 vs 64"), line
    line = _one_line_error(capsys, io_main, ["export", str(run), "--set", "kappa=2", "--out", str(tmp_path / "t.pth")])
    assert "--set applies only to an official checkpoint" in line, line
    assert knn.main(["--checkpoint", str(run), "--preset", "tiny", "--data", str(data), "--output",
                     str(tmp_path / "k.json"), "--num-workers", "0"]) == 0, "a preset that agrees is accepted"
    assert not list(tmp_path.glob("*.pth")), "nothing was exported"


def _edited_export(tmp_path, suffix, edit) -> Path:
    """A timm export of the tiny teacher whose metadata (timm_kwargs, as stored) went through edit()."""
    path = tmp_path / f"teacher{suffix}"
    export_teacher_timm(tiny_model(), path)
    if suffix == ".pth":
        saved = torch.load(path, weights_only=True)
        saved["timm_kwargs"] = edit(saved["timm_kwargs"])
        torch.save(saved, path)
    else:
        from safetensors.torch import load_file, safe_open, save_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        meta["timm_kwargs"] = edit(json.loads(meta["timm_kwargs"]))
        if not isinstance(meta["timm_kwargs"], str):
            meta["timm_kwargs"] = json.dumps(meta["timm_kwargs"])
        save_file(load_file(str(path)), str(path), metadata=meta)
    return path


EXPORT_EDITS = {
    "heads": (lambda kw: {**kw, "num_heads": 4}, "its metadata and weights do not match the sha256 recorded at export"),
    "mlp ratio": (lambda kw: {**kw, "mlp_ratio": 2.0},
                  "weights of another architecture than its metadata says (mlp_ratio 2.0 in the metadata, 4.0 in the "
                  "weights)"),
    "missing depth": (lambda kw: {k: v for k, v in kw.items() if k != "depth"},
                      "malformed export metadata: timm_kwargs lacks depth"),
    "depth a word": (lambda kw: {**kw, "depth": "three"}, "malformed export metadata: setting depth='three'"),
    "depth a bool": (lambda kw: {**kw, "depth": True}, "malformed export metadata: setting depth=True"),
    "heads 0": (lambda kw: {**kw, "num_heads": 0}, "malformed export metadata: num_heads=0 must be >= 1"),
    "a list": (lambda kw: [kw], "malformed export metadata: timm_kwargs is a list, not a mapping"),
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", sorted(EXPORT_EDITS))
def test_export_metadata_that_disagrees_with_the_weights_or_is_malformed_is_one_line(
        setup, tmp_path, capsys, case, suffix):
    _, data = setup
    edit, named = EXPORT_EDITS[case]
    path = _edited_export(tmp_path, suffix, edit)
    line = _one_line_error(capsys, knn.main, ["--checkpoint", str(path), "--data", str(data), "--output",
                                              str(tmp_path / "k.json")])
    assert line.startswith(f"error: --checkpoint {path}: ") and named in line, line


def test_export_metadata_that_is_not_json_is_one_line(setup, tmp_path, capsys):
    _, data = setup
    path = _edited_export(tmp_path, ".safetensors", lambda kw: "{depth: 3")
    line = _one_line_error(capsys, knn.main, ["--checkpoint", str(path), "--data", str(data), "--output",
                                              str(tmp_path / "k.json")])
    assert line.startswith(f"error: --checkpoint {path}: malformed export metadata: timm_kwargs is not JSON"), line


def test_an_export_that_fails_leaves_no_file(setup, tmp_path, capsys, monkeypatch):
    run, _ = setup

    def disk_full(obj, path, *args, **kwargs):  # as torch.save's C++ writer fails on ENOSPC
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", disk_full)
    line = _one_line_error(capsys, io_main, ["export", str(run), "--out", str(tmp_path / "t.pth")])
    assert line.startswith(f"error: --out {tmp_path / 't.pth'} could not be written ([enforce fail"), line
    assert list(tmp_path.iterdir()) == [], "neither the file nor a temporary one"
