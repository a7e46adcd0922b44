"""Every reader of a file we wrote treats a damaged record like a torn line: skipped, counted, named in one line,
never blocking. One test per reader, over every kind of damage: a line cut short, bytes that are not UTF-8,
random bytes, JSON of another shape (`123`, `{"a": 1}`, `[["x", 1]]`, `null`), numbers that are not finite
(`Infinity`, `NaN`, `1e400`) or too large for any step."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moca_fast.data import scan
from moca_fast.data.scan import scan_images
from moca_fast.data.scan_cache import header, journal_folder, read_journal, scans_folder
from moca_fast.records import BadRecord, metrics_record, parse_json, read_json_lines, read_pointer
from moca_fast.errors import ConfigError
from moca_fast.io import checkpoints as ckpt
from moca_fast.train.run_log import _drop_records_after, read_random_init
from moca_fast.figures import curves

REPO = Path(__file__).resolve().parents[1]

DAMAGE = {
    "cut short": b'{"step": 9, "lo',
    "not UTF-8": b'{"step": 3, "loss": "\xff\xfe"}',
    "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8)).replace(b"\n", b" "),
    "a number": b"123",
    "another object": b'{"a": 1}',
    "a list": b'[["x", 1]]',
    "null": b"null",
    "Infinity": b'{"step": Infinity, "loss": 1.0}',
    "1e400": b'{"step": 1e400, "loss": 1.0}',
    "NaN": b'{"step": 4, "loss": NaN}',
    "a step beyond int64": b'{"step": 1' + b"0" * 30 + b', "loss": 1.0}',
    "an integer of 5000 digits": b'{"step": 2, "loss": 1' + b"0" * 5000 + b"}",
    "a step that is text": b'{"step": "5", "loss": 1.0}',
}
KINDS = pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))


def metrics_lines(steps) -> list[bytes]:
    return [json.dumps({"step": s, "epoch": s / 10, "loss": 1.0 / s, "lr": 0.1}).encode() for s in steps]


def test_parse_json_accepts_only_strict_utf8_and_finite_numbers():
    assert parse_json(b'{"a": [1, 2.5, "\xc3\xa9"]}') == {"a": [1, 2.5, "\u00e9"]}
    for damage in DAMAGE.values():
        try:
            metrics_record(parse_json(damage))
        except BadRecord as e:
            assert str(e) and "\n" not in str(e)
        else:
            pytest.fail(f"{damage!r} read as a metrics record")
    records, skipped = read_json_lines(b"\n".join(metrics_lines([1, 2])) + b"\n123\n", "m.jsonl", metrics_record)
    assert [r["step"] for r in records] == [1, 2]
    assert (skipped.count, skipped.first) == (1, "line 3: the record is not an object")


@KINDS
def test_a_damaged_scan_journal_line_is_skipped_and_the_journal_rewritten(tmp_path, monkeypatch, caplog, damage):
    root = tmp_path / "data"
    for i in range(6):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"c{i % 2}" / f"{i}.jpg")
    first = scan_images(root, processes=1)
    journal = sorted(journal_folder(root, scans_folder()).glob("*.jsonl"))[0]
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:1] + [damage] + lines[1:]))  # between the header and the verdicts
    calls = []
    real = scan.inspect_image
    monkeypatch.setattr(scan, "inspect_image", lambda p: calls.append(p) or real(p))
    with caplog.at_level(logging.WARNING, "moca_fast.data"):
        assert scan_images(root, processes=1) == first
    assert calls == []  # every verdict of the intact lines is reused
    # the test's own folder name holds "damaged" too, and an earlier test may have let INFO lines through
    warned = [r.getMessage() for r in caplog.records if "damaged journal lines" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{journal}: skipped 1 damaged journal lines (first: line 2: ")
    assert damage not in journal.read_bytes().split(b"\n")  # rewritten: the next scan finds nothing to skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, "moca_fast.data"):
        scan_images(root, processes=1)
    assert "damaged journal lines" not in caplog.text


@pytest.mark.parametrize("entry", [b'[["c0/0.jpg", 1, 2, "maybe"]]', b'[["c0/0.jpg", 1, 2]]', b'[[1, 1, 2, "ok"]]',
                                   b'[["c0/0.jpg", 1.5, 2, "ok"]]', b'[["c0/0.jpg", true, 2, "ok"]]', b'{"c0": 1}'])
def test_a_journal_line_of_entries_of_another_shape_is_skipped(tmp_path, entry):
    path = tmp_path / "j.jsonl"
    good = json.dumps([["c0/1.jpg", 10, 20, "ok"], ["c0/2.jpg", 11, 21, "bad:too small"]]).encode()
    path.write_bytes(json.dumps(header(None, "c0")).encode() + b"\n" + entry + b"\n" + good + b"\n")
    entries, rewrite = read_journal(path, header(None, "c0"))
    assert entries == {"c0/1.jpg": (10, 20, "ok"), "c0/2.jpg": (11, 21, "bad:too small")} and rewrite


@KINDS
def test_curves_skip_and_count_a_damaged_metrics_record(tmp_path, caplog, damage):
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(metrics_lines([1, 2]) + [damage] + metrics_lines([3])) + b"\n")
    (tmp_path / "eval.json").write_bytes(damage)
    with caplog.at_level(logging.WARNING, "moca_fast.viz"):
        run = curves.read_run(tmp_path, "run")
    assert run.series["loss"][0] == [1, 2, 3] and run.skipped_lines == 2 and "knn_top1" not in run.series
    assert f"{tmp_path / 'metrics.jsonl'}: skipped 1 damaged records (first: line 3: " in caplog.text
    assert f"skipped a damaged evaluation file: {tmp_path / 'eval.json'}: " in caplog.text


def test_the_curves_command_draws_a_run_whose_metrics_hold_every_kind_of_damage(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\n".join(metrics_lines([1, 2]) + list(DAMAGE.values()) + metrics_lines([3])))
    proc = subprocess.run([sys.executable, "-m", "moca_fast.viz", "curves", str(run), "--output",
                           str(tmp_path / "c.png")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{run / 'metrics.jsonl'}: skipped {len(DAMAGE)} damaged records (first: line 3: " in proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "c.png").stat().st_size > 0


@KINDS
def test_a_resume_drops_damaged_metrics_lines_and_keeps_the_others(tmp_path, caplog, damage):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"\n".join(metrics_lines([1]) + [damage] + metrics_lines([2, 3])))  # no final newline
    with caplog.at_level(logging.WARNING, "moca_fast.train"):
        _drop_records_after(path, 2)
    assert path.read_bytes() == b"\n".join(metrics_lines([1, 2])) + b"\n"
    assert f"{path}: skipped 1 damaged metrics records (dropped) (first: line 2: " in caplog.text


def _checkpoint(tmp_path) -> Path:
    folder = tmp_path / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    (folder / "trainer_rank00000.pt").write_bytes(b"weights")
    meta = {"world_size": 1, "step": 1, "epoch": 0.1, "steps_per_epoch": 10, "config": {}, "data": None,
            "files": ckpt.file_digests(folder)}
    (folder / ckpt.META).write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text(folder.name + "\n")
    return folder


@pytest.mark.parametrize("damage", list(DAMAGE.values()) + [b'{"world_size": 1, "step": 1, "config": {}, "files": []}',
                                                           b'{"world_size": 0, "step": 1, "config": {}, "files": {}}',
                                                           b'{"world_size": 1, "step": 1, "config": {}, "files": '
                                                           b'{"a": {"size": -1, "crc32": "00"}}}'],
                         ids=list(DAMAGE) + ["files as a list", "no rank", "a negative size"])
def test_a_damaged_checkpoint_meta_is_skipped_by_resume_auto_and_refused_by_name(tmp_path, caplog, damage):
    older = _checkpoint(tmp_path)
    newer = older.with_name("step_00000002")
    newer.mkdir()
    (newer / ckpt.META).write_bytes(damage)
    problem = ckpt.verify_checkpoint(newer)
    assert problem.startswith("meta.json is damaged (") and "\n" not in problem
    with caplog.at_level(logging.WARNING, "moca_fast.train"):
        assert ckpt.resolve_resume("auto", tmp_path) == older
    assert f"skipping checkpoint {newer}: meta.json is damaged (" in caplog.text
    with pytest.raises(ConfigError, match=r"^--resume .*step_00000002: damaged checkpoint \(meta.json is damaged"):
        ckpt.resolve_resume(str(newer), tmp_path)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\n", b"../../elsewhere\n", b"\n", b"a/b"])
def test_a_damaged_latest_pointer_is_one_line_naming_it(tmp_path, pointer):
    _checkpoint(tmp_path)
    latest = tmp_path / "checkpoints" / ckpt.LATEST
    latest.write_bytes(pointer)
    with pytest.raises(BadRecord, match=r"^.*latest: damaged \("):
        read_pointer(latest)
    with pytest.raises(ConfigError, match=f"^{latest}: damaged"):
        ckpt.resolve_resume(None, tmp_path)


@KINDS
def test_a_damaged_random_init_result_is_not_reported_and_never_blocks(tmp_path, caplog, damage):
    path = tmp_path / "knn_random_init.json"
    path.write_bytes(damage)
    with caplog.at_level(logging.WARNING, "moca_fast.train"):
        assert read_random_init(path) == {}
    assert f"the k-NN at random initialisation is not reported: {path}: " in caplog.text
    path.write_text(json.dumps({"top1": 51.5, "top5": 89.0, "k": 20}))
    assert read_random_init(path) == {"top1": 51.5, "top5": 89.0}
