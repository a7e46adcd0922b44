"""The scan at scale: worker processes, journals kept chunk by chunk (an interrupted scan resumes), the
pixel limit, file names that would split a log line, the `python -m moca_fast.data scan` command, and
rank 0's heartbeat while the other ranks wait for its scan."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from moca_fast.data import scan
from moca_fast.data.scan import scan_images
from moca_fast.data.scan_cache import journal_folder, scans_folder
from moca_fast.data.scan_pool import Progress
from moca_fast.errors import ConfigError
from spawned_ranks import CONTEXT, start_ranks

REPO = Path(__file__).resolve().parents[1]


def tiny_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_folder(root: Path, count: int, classes: int = 4) -> Path:
    for i in range(count):
        path = root / f"c{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_jpeg(i))
    return root


def journal_entries(root: Path) -> int:
    count = 0
    for journal in journal_folder(root, scans_folder()).glob("*.jsonl"):
        for line in journal.read_bytes().split(b"\n")[1:]:
            try:
                count += len(json.loads(line))
            except ValueError:  # an empty or torn last line
                pass
    return count


def counting_checks(monkeypatch) -> list:
    calls = []
    real = scan.inspect_image
    monkeypatch.setattr(scan, "inspect_image", lambda p: calls.append(p) or real(p))
    return calls


SLOW_SCAN = textwrap.dedent("""
    import os, sys, time
    from moca_fast.data import scan
    real = scan.inspect_image
    def held(path):  # the files of the last class are never checked: the scan is running when the test stops it
        while os.path.basename(os.path.dirname(path)) == "c3":
            time.sleep(1)
        return real(path)
    scan.inspect_image = held
    scan.scan_images(sys.argv[1], processes=2)
""")


def test_an_interrupted_scan_keeps_what_it_checked_and_its_workers_die_with_it(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", 1200)
    child = subprocess.Popen([sys.executable, "-c", SLOW_SCAN, str(root)], cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while journal_entries(root) < 2 * scan.CHECK_CHUNK:  # two chunks checked
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the scan saved nothing within 120 s"
            time.sleep(0.05)
        workers = psutil.Process(child.pid).children()
        assert len(workers) == 2
        child.send_signal(signal.SIGTERM)  # default action: the scanning process dies at once
        child.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == [], "scan workers outlived their parent"
    finally:
        child.kill()
        child.wait()
    kept = journal_entries(root)
    assert 2 * scan.CHECK_CHUNK <= kept <= 900  # c3's 300 files were never checked
    calls = counting_checks(monkeypatch)
    images = scan_images(root, processes=1)
    assert len(images) == 1200 and len(calls) == 1200 - kept  # resumed: only the files not yet checked


SLOW_SCAN_COMMAND = SLOW_SCAN.replace("scan.scan_images(sys.argv[1], processes=2)", """
from moca_fast.data.__main__ import main
sys.exit(main(["scan", sys.argv[1], "--processes", "2"]))""")


def test_the_scan_command_stopped_mid_scan_says_so_in_one_line_and_resumes(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", 1200)
    child = subprocess.Popen([sys.executable, "-c", SLOW_SCAN_COMMAND, str(root)], cwd=REPO, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while journal_entries(root) < 2 * scan.CHECK_CHUNK:
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the scan saved nothing within 120 s"
            time.sleep(0.05)
        workers = psutil.Process(child.pid).children()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=30)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 128 + signal.SIGTERM and alive == [], err[-2000:]
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1] == (
        "stopped by SIGTERM during the scan: the files checked so far are kept; the same command resumes")
    kept = journal_entries(root)
    assert 2 * scan.CHECK_CHUNK <= kept <= 900
    calls = counting_checks(monkeypatch)
    assert len(scan_images(root, processes=1)) == 1200 and len(calls) == 1200 - kept


def test_parallel_and_serial_scans_agree_across_linked_class_folders(tmp_path):
    root = tmp_path / "data"
    write_folder(root, 40, classes=3)
    shared = tmp_path / "shared"
    write_folder(shared, 3, classes=1)
    os.symlink(shared, root / "c0" / "link_a")  # one folder reached from two class folders
    os.symlink(shared, root / "c2" / "link_b")
    os.link(root / "c0" / "00000.jpg", root / "c1" / "hard_link.jpg")  # one file in two classes
    os.symlink(root / "c1", root / "c2" / "to_c1")  # a class folder reached again
    serial = scan_images(root, processes=1)
    os.utime(root / "c0" / "00003.jpg")  # one file to check again, so that both phases run in workers
    parallel = scan_images(root, processes=2)
    assert parallel == serial
    assert len(serial) == 40 + 3 and dict(serial.ignored) == {
        str(root / "c1" / "hard_link.jpg"): f"duplicate: the same file as {root / 'c0' / '00000.jpg'}",
        str(root / "c2" / "link_b"): "folder already walked (a symlink loop or a second link to it)",
        str(root / "c2" / "to_c1"): "folder already walked (a symlink loop or a second link to it)"}
    assert serial.labels.tolist() == [0] * 17 + [1] * 13 + [2] * 13


def test_a_torn_journal_keeps_its_complete_lines(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", 30, classes=1)
    scan_images(root, processes=1)
    journal, = journal_folder(root, scans_folder()).glob("*.jsonl")
    lines = journal.read_bytes().split(b"\n")
    entries = json.loads(lines[1])
    half = len(entries) // 2
    first, second = json.dumps(entries[:half]).encode(), json.dumps(entries[half:]).encode()
    journal.write_bytes(lines[0] + b"\n" + first + b"\n" + second[: len(second) // 2])  # killed mid-write
    calls = counting_checks(monkeypatch)
    assert len(scan_images(root, processes=1)) == 30 and len(calls) == 30 - half
    calls.clear()
    assert len(scan_images(root, processes=1)) == 30 and calls == []  # rewritten whole


def test_an_image_over_the_pixel_limit_is_skipped_at_scan_time_with_its_reason(tmp_path, caplog):
    root = tmp_path / "data"
    write_folder(root, 4, classes=1)
    buf = io.BytesIO()
    Image.new("L", (12000, 12000), 128).save(buf, "JPEG", quality=50)  # 144 M pixels, 1.7 MB
    (root / "c0" / "huge.jpg").write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING, logger="moca_fast.data"):
        images = scan_images(root, processes=1)
    assert len(images) == 4 and str(root / "c0" / "huge.jpg") not in images.files
    (path, reason), = images.skipped
    assert path == str(root / "c0" / "huge.jpg")
    assert reason.startswith("too large: 12000x12000 pixels, more than the limit of 89,478,485")
    assert "skipping 1 bad image files" in caplog.text
    with pytest.raises(ConfigError, match="huge.jpg: too large: 12000x12000"):
        scan_images(root, bad_files="error")


def test_file_names_with_control_characters_stay_on_their_log_line(tmp_path, caplog):
    root = tmp_path / "data"
    write_folder(root, 3, classes=1)
    (root / "c0" / "two\nlines.jpg").write_bytes(b"not a jpeg")
    (root / "c0" / "esc\x1b[2J.jpg").write_bytes(b"")
    (root / "c0" / "notes\r.txt").write_bytes(b"text")
    (root / "c0" / os.fsdecode(b"bad-utf8-\xff.jpg")).write_bytes(b"not a jpeg")
    with caplog.at_level(logging.INFO, logger="moca_fast.data"):
        images = scan_images(root, processes=1)
    assert len(images) == 3 and len(images.skipped) == 3
    for record in caplog.records:
        first, *entries = record.getMessage().split("\n")
        assert all(line.startswith(f"  {root}/c0/") for line in entries), record.getMessage()
    text = caplog.text
    assert "two\\nlines.jpg: not an image PIL can decode" in text and "esc\\x1b[2J.jpg: empty file" in text
    assert "notes\\r.txt: not an image" in text and "bad-utf8-\\xff.jpg" in text
    with pytest.raises(ConfigError) as error:
        scan_images(root, bad_files="error")
    assert "\n" not in str(error.value) and "bad-utf8-\\xff.jpg: not an image" in str(error.value)


def test_progress_line_has_the_rate_and_the_time_left():
    progress = Progress(1000, "scan of /data", enabled=False)
    progress.started -= 2.0
    progress.update(250)
    line = progress.line()
    assert line.startswith("scan of /data: 250/1,000 files (25 %), ") and " files/s, ETA " in line
    rate = float(line.split(", ")[1].split()[0].replace(",", ""))
    assert 60 < rate <= 125  # 250 files in at least 2 s


def test_scan_command_runs_ahead_and_the_trainer_reuses_its_verdicts(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", 90, classes=3)
    (root / "c1" / "bad.jpg").write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "moca_fast.data", "scan", str(root), "--processes", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{root}: 90 images in 3 classes, 1 bad file skipped, 0 other entries not used; "
                              "checked 91 files")
    assert "files/s" in summary and f"verdicts in {journal_folder(root, scans_folder())}" in summary
    calls = counting_checks(monkeypatch)
    assert len(scan_images(root)) == 90 and calls == []
    missing = subprocess.run([sys.executable, "-m", "moca_fast.data", "scan", str(tmp_path / "nowhere")], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: data folder {tmp_path / 'nowhere'} does not exist or is not a folder"]


# ---------------------------------------------------------------- rank 0 computes, the others wait

def _slow_rank0(rank, init_file, results):
    from datetime import timedelta

    import torch.distributed as dist

    from moca_fast.distributed import on_rank0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=3))
    try:
        results.put((rank, on_rank0(lambda: time.sleep(8) or "scanned")))
        results.put((rank, on_rank0(lambda: (_ for _ in ()).throw(ConfigError("bad folder")))))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_ranks_wait_for_a_long_rank0_computation_past_the_process_group_timeout(tmp_path):
    results = CONTEXT.Queue()
    procs = start_ranks(_slow_rank0, [(r, str(tmp_path / "init"), results) for r in range(2)])
    try:
        got = [results.get(timeout=120) for _ in range(4)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    by_rank = {r: [v for rank, v in got if rank == r] for r in range(2)}
    assert by_rank[1][0] == "scanned", by_rank  # waited 8 s under a 3 s process-group timeout
    assert by_rank[0] == ["scanned", "ConfigError: bad folder"] and by_rank[1][1] == "ConfigError: bad folder"


# ---------------------------------------------------------------- the k-NN folders within a run

KNN_RUN = textwrap.dedent("""
    import collections, json, os, sys
    import moca_fast.data as data
    from moca_fast.config import load_config
    from moca_fast.train.loop import Trainer
    train, bank, val, output = sys.argv[1:5]
    scans = collections.Counter()
    real = data.scan_images
    data.scan_images = lambda root, *a, **k: scans.update([os.fspath(root)]) or real(root, *a, **k)
    cfg = load_config("tiny", None, dict(data=train, knn_train=bank, knn_val=val, epochs=2, eval_every=1,
                                         batch_size=4, num_workers=0, output=output, data_backend="torch",
                                         log_every=1, ckpt_every=100))
    result = Trainer(cfg).train()
    print(json.dumps({"scans": scans, "final_knn": "knn_top1" in result}))
""")


def test_a_run_scans_its_knn_folders_once_whatever_the_number_of_evaluations(tmp_path):
    from moca_fast.distributed import free_port
    from jpeg_folder import write_class_folders

    folders = [str(write_class_folders(tmp_path / name, 4)) for name in ("train", "bank", "val")]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", KNN_RUN, *folders, str(tmp_path / "run")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("knn_top1" in m for m in metrics) == 1 and result["final_knn"]  # + random init: 3 evaluations
    assert result["scans"] == {folder: 1 for folder in folders}
