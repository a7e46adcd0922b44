"""Nothing is written into a data folder: the scan keeps its verdicts in the user's cache (keyed by the
folder's real path) or in a folder the user names; a `.moca_fast_scan/` of older versions is used once and
moved out; a scan, a training, an evaluation and a picture through their real entry points leave every byte and every
directory entry of the data folder as it was, and torchvision's ImageFolder still reads it."""
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from torchvision.datasets import ImageFolder

from eval_data import make_eval_data
from test_data_scan_scale import counting_checks
from moca_fast.data import scan_cache
from moca_fast.data.scan import scan_images
from moca_fast.data.scan_cache import LEGACY_DIR_NAME, journal_folder, scans_folder

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict:
    """{relative path: what it is}: every folder's mode, mtime and entry names; every file's mode, size, mtime
    and SHA-256."""
    found = {}
    for folder, dirs, files in os.walk(root):
        st = os.stat(folder)
        found[os.path.relpath(folder, root)] = ("dir", st.st_mode, st.st_mtime_ns, sorted(dirs + files))
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


def test_the_verdicts_live_in_the_cache_keyed_by_the_real_path(tmp_path, monkeypatch):
    data = make_eval_data(tmp_path / "data") / "train"
    before = snapshot(data)
    monkeypatch.delenv("MOCA_FAST_SCAN_CACHE")
    monkeypatch.delenv("MOCA_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    calls = counting_checks(monkeypatch)
    scan_images(data, processes=1)
    folder = tmp_path / "xdg" / "moca_fast" / "scans" / hashlib.sha1(os.fsencode(str(data))).hexdigest()[:16]
    assert len(calls) == 18 and journal_folder(data, scans_folder()) == folder
    assert len(list(folder.glob("*.jsonl"))) == 3
    (tmp_path / "link").symlink_to(data)
    calls.clear()
    assert len(scan_images(tmp_path / "link", processes=1)) == 18 and calls == []  # the same real folder
    monkeypatch.setenv("MOCA_FAST_CACHE", str(tmp_path / "own"))
    assert scans_folder() == tmp_path / "own" / "scans"
    monkeypatch.setenv("MOCA_FAST_SCAN_CACHE", str(tmp_path / "env"))
    assert scans_folder() == tmp_path / "env" and scans_folder(tmp_path / "named") == tmp_path / "named"
    scan_images(data, processes=1, scan_cache=str(tmp_path / "named"))
    assert len(calls) == 18 and len(list(journal_folder(data, tmp_path / "named").glob("*.jsonl"))) == 3
    assert snapshot(data) == before


def _legacy_folder(tmp_path, monkeypatch) -> Path:
    """A data folder holding the journals an older version kept in it."""
    data = make_eval_data(tmp_path / "data") / "train"
    scan_images(data, processes=1, scan_cache=str(tmp_path / "old"))
    shutil.copytree(journal_folder(data, tmp_path / "old"), data / LEGACY_DIR_NAME)
    return data


def test_an_older_versions_scan_folder_is_used_once_and_moved_out(tmp_path, monkeypatch, caplog):
    data = _legacy_folder(tmp_path, monkeypatch)
    calls = counting_checks(monkeypatch)
    with caplog.at_level(logging.INFO, "moca_fast.data"):
        assert len(scan_images(data, processes=1, scan_cache=str(tmp_path / "new"))) == 18
    target = journal_folder(data, tmp_path / "new")
    assert calls == [] and not (data / LEGACY_DIR_NAME).exists() and len(list(target.glob("*.jsonl"))) == 3
    assert f"moved the scan cache an older version left in {data / LEGACY_DIR_NAME} to {target} (3 journals)" \
        in caplog.text and "18 of 18 verdicts reused" in caplog.text
    assert len(ImageFolder(str(data))) == 18


def test_an_older_versions_scan_folder_in_a_read_only_folder_is_read_in_place(tmp_path, monkeypatch, caplog):
    data = _legacy_folder(tmp_path, monkeypatch)
    before = snapshot(data)
    monkeypatch.setattr(scan_cache, "_writable", lambda folder: False)  # root ignores permissions
    calls = counting_checks(monkeypatch)
    with caplog.at_level(logging.INFO, "moca_fast.data"):
        scan_images(data, processes=1, scan_cache=str(tmp_path / "new"))
        scan_images(data, processes=1, scan_cache=str(tmp_path / "new"))
    assert calls == [] and snapshot(data) == before
    assert caplog.text.count("it stays there: the data folder is not writable") == 1


def test_a_new_machine_scans_again_and_says_so(tmp_path, monkeypatch, caplog):
    data = make_eval_data(tmp_path / "data") / "train"
    with caplog.at_level(logging.INFO, "moca_fast.data"):
        scan_images(data, processes=1, scan_cache=str(tmp_path / "machine_a"))
    assert "no verdicts there yet, every file is checked" in caplog.text


def test_scan_training_evaluation_and_pictures_leave_the_data_folder_as_it_was(tmp_path):
    data = make_eval_data(tmp_path / "data")
    before = snapshot(data)
    env = {key: value for key, value in os.environ.items() if key not in ("MOCA_FAST_SCAN_CACHE", "MOCA_FAST_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def run(*args):
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("-m", "moca_fast.data", "scan", str(data / "train"), "--processes", "1")
    trained = run(str(REPO / "launch" / "train.py"), "--preset", "tiny", "--data", str(data / "train"),
                  "--output", str(tmp_path / "run"), "--max-steps", "2", "--data-backend", "torch", "batch_size=4",
                  "num_workers=0", "log_every=1", f"knn_train={data / 'train'}", f"knn_val={data / 'val'}")
    assert "18 of 18 verdicts reused" in trained.stderr
    run("-m", "moca_fast.eval", "knn", "--checkpoint", str(tmp_path / "run"), "--data", str(data),
        "--output", str(tmp_path / "knn.json"), "--num-workers", "0")
    run("-m", "moca_fast.viz", "neighbors", "--checkpoint", str(tmp_path / "run"), "--train", str(data / "train"),
        str(data / "val"), "--output", str(tmp_path / "n.png"), "--num-workers", "0")
    assert snapshot(data) == before
    assert len(list((tmp_path / "xdg" / "moca_fast" / "scans").glob("*/*.jsonl"))) == 6  # train/ and val/
    for split in ("train", "val"):
        assert len(ImageFolder(str(data / split))) == (18 if split == "train" else 9)
