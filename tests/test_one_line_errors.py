"""Issue 19: one line for every error, from the first line of main, for every entry point (launch/train.py,
python -m moca_fast.eval, python -m moca_fast.io), and a stop that ends a main blocked in C at once.

A taken master port names the port and the flag; a bad setting is printed once however many ranks; an error
before the output folder exists keeps its traceback in a file the line names; a flag that does not parse is
one line; a grad_accum that leaves batches of an epoch unused says so once."""
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from moca_fast.distributed import free_port
from test_safety import _launch
from test_train_e2e import LAUNCH, REPO, TINY_RUN, _deepspeed_cli, _env


def _deepspeed(ranks: int, port: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_deepspeed_cli() + ["--num_gpus", str(ranks), "--master_port", str(port), LAUNCH] + TINY_RUN
                          + ["--data-backend", "synthetic"] + args, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _error_lines(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error")]


def test_a_taken_master_port_is_one_line_naming_it_and_the_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = _deepspeed(1, port, ["--output", str(tmp_path / "run")])
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert _error_lines(run) == [f"error: the master port {port} of 127.0.0.1 is in use (another run or program); "
                                 f"choose a free one with `deepspeed --master_port PORT ...`"]
    assert "Traceback" not in run.stdout + run.stderr


def test_a_bad_setting_is_one_line_once_whatever_the_number_of_ranks(tmp_path):
    run = _deepspeed(2, free_port(), ["--output", str(tmp_path / "run"), "embed_dim=30"])
    assert run.returncode == 2
    assert _error_lines(run) == ["error: embed_dim and decoder_embed_dim must be multiples of 4 (2-D sin-cos "
                                 "position embedding)"], run.stdout[-2000:] + run.stderr[-2000:]


def test_an_error_before_the_output_folder_exists_keeps_its_traceback_in_a_file_the_line_names(
        tmp_path, capfd, monkeypatch):
    import moca_fast.config

    def broken(*args, **kwargs):
        raise RuntimeError("a bug before the run folder exists")

    monkeypatch.setattr(moca_fast.config, "load_config", broken)
    out = tmp_path / "not" / "yet"
    assert _launch(["--output", str(out)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and len(err) == 1, err
    head, _, kept = err[0].partition(" (traceback in ")
    assert head == "error: rank 0: RuntimeError: a bug before the run folder exists; no checkpoint is complete yet"
    assert kept.startswith(os.path.join(tempfile.gettempdir(), "moca_fast-error-")), kept
    assert "in broken" in open(kept.rstrip(")")).read()
    assert not out.exists()


def test_a_flag_that_does_not_parse_is_one_line(capfd):
    with pytest.raises(SystemExit) as ended:
        _launch(["--epochs", "many"])
    assert ended.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --epochs: invalid int value: 'many' (see "), err


def test_an_unused_grad_accum_remainder_is_logged_once(one_process_group, tmp_path, capfd):
    # synthetic data: 1,281,167 images, 320,291 batches of 4 per epoch; grad_accum=3 leaves 2 of them unused
    assert _launch(["--output", str(tmp_path / "run"), "--max-steps", "1", "grad_accum=3"]) == 0
    logged = capfd.readouterr().err
    assert logged.count("an epoch has 320291 batches per rank and grad_accum=3: the last 2 batch(es) of every epoch "
                        "are not used (106763 optimiser steps per epoch)") == 1, logged


def test_an_unexpected_error_in_eval_or_io_is_one_line_with_its_traceback_in_a_file(tmp_path, capfd, monkeypatch):
    from eval_data import make_eval_data, make_run
    from moca_fast.eval import knn
    from moca_fast.io import __main__ as io_cli
    from moca_fast.io import timm_export

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the middle of the command")

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # an earlier test's handler writes to its closed capture
    monkeypatch.setattr(knn, "knn_sweep_correct", broken)
    monkeypatch.setattr(timm_export, "export_teacher_timm", broken)
    run, data = make_run(tmp_path / "run"), make_eval_data(tmp_path / "data")
    assert knn.main(["--checkpoint", str(run), "--data", str(data), "--output", str(tmp_path / "knn.json")]) == 1
    assert io_cli.main(["export", str(run), "--out", str(tmp_path / "teacher.pth")]) == 1
    err = capfd.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    lines = [line for line in err if line.startswith("error")]
    assert len(lines) == 2 and all(line.startswith("error: rank 0: RuntimeError: a bug in the middle of the command "
                                                   f"(traceback in {tempfile.gettempdir()}/moca_fast-error-")
                                   for line in lines), lines
    assert not (tmp_path / "knn.json").exists() and not (tmp_path / "teacher.pth").exists()


def test_a_stop_while_a_result_is_written_leaves_neither_it_nor_its_temporary_file(tmp_path):
    """An immediate stop ends the process from the watcher thread (os._exit: no finally block runs); the
    temporary file of the atomic write under way is removed all the same."""
    script = textwrap.dedent(f"""
        import sys, time
        from moca_fast.entry import run_main
        from moca_fast.output_files import atomic_file

        def writing(end):
            with atomic_file({str(tmp_path / "result.json")!r}) as tmp:
                tmp.write_text("half a res")
                print("writing", flush=True)
                time.sleep(120)
            return 0

        sys.exit(run_main(writing, known=lambda error: None))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir()] == [f".result.json.{proc.pid}.tmp"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == []


def test_a_stop_ends_a_main_blocked_in_c_at_once_with_one_line(tmp_path):
    """The watcher thread ends the process even though the main thread never returns to Python (here: a pipe
    nobody writes to, as a rank waiting in a collective for a rank that scans)."""
    script = textwrap.dedent("""
        import os, sys
        from moca_fast.entry import run_main

        def blocked(end):
            read, _ = os.pipe()
            print("blocked", flush=True)
            return len(os.read(read, 1))

        sys.exit(run_main(blocked, known=lambda error: None))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "blocked"
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process outlived its SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == ["stopped by SIGTERM before step 1: nothing to save"], err
