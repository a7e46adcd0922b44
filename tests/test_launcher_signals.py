"""Stop signals under the deepspeed launcher, as a cluster scheduler or a terminal sends them, and two launchers
as two nodes.

- after step 1, SIGTERM to the `deepspeed` command alone (it dies and leaves launch.py and the ranks running):
  the ranks see their launcher gone, save the step reached and exit; SIGHUP to the whole process group (a
  closed terminal: the launchers die of it); two SIGINTs 20 ms apart to the group (Ctrl-C twice; launch.py
  forwards SIGTERM and SIGKILLs after 30 s): each run saves the step reached, the second SIGINT is logged;
- before step 1 (a slow data scan on rank 0 while rank 1 waits in a collective; a slow DeepSpeed start-up):
  SIGTERM to the command or Ctrl-C end every rank within seconds, with one line saying nothing was saved;
- a rank that dies inside DeepSpeed's save_checkpoint (it raises, or is SIGKILLed): the others end within
  seconds, with one line, and the previous checkpoint stays the latest;
- two `deepspeed --no_ssh --num_nodes 2 --node_rank 0|1` on 127.0.0.1, one rank each (RANK 0 and 1, both
  LOCAL_RANK 0) writing one shared folder: a SIGTERM to node 1's launcher stops both nodes at the same
  step, and the resumed run is bit-identical to an uninterrupted one.

A stop in the training loop is sent while the run is held after a step the test chooses (fault_launch.py's
`hold`), and the run is released once it has logged the request: the stop then takes effect at the next step,
however fast or loaded the machine is.
"""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moca_fast.distributed import free_port
from jpeg_folder import write_class_folders
from test_train_e2e import LAUNCH, REPO, TINY_RUN, _assert_identical, _deepspeed_cli, _env, _load, _metrics

FOREVER = ["--max-steps", "100000", "epochs=1000"]
FAULT_LAUNCH = str(REPO / "tests" / "fault_launch.py")


def _launch(launcher_args: list[str], args: list[str], log: Path, script: str = LAUNCH,
            env: dict | None = None) -> subprocess.Popen:
    """The deepspeed launcher in a process group (session) of its own, as a scheduler starts it; a key=value of
    `args` replaces TINY_RUN's (a setting given twice is refused)."""
    given = {arg.split("=", 1)[0] for arg in args if "=" in arg and not arg.startswith("-")}
    tiny = [arg for arg in TINY_RUN if arg.split("=", 1)[0] not in given]
    cmd = _deepspeed_cli() + launcher_args + [script] + tiny + args
    return subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_text(run: subprocess.Popen, log: Path, text: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert time.time() < deadline and run.poll() is None, f"{text!r} not seen:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


def _wait_until_gone(launchers: list[subprocess.Popen], logs: list[Path], timeout: float = 150) -> None:
    """Waits until no process of the launchers' process groups is left (ranks, workers, launchers)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for launcher in launchers:
            launcher.poll()  # reaps the launcher (a zombie still counts as a member of its group)
            try:
                os.killpg(launcher.pid, 0)
                alive.append(launcher.pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        if time.time() > deadline:
            for group in alive:
                os.killpg(group, signal.SIGKILL)
            pytest.fail("ranks still running after the SIGTERM:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
        time.sleep(0.3)


def _held(launch, logs: list[Path], after: int, release: Path):
    """launch(env): launchers (writing `logs`) of a run held after its `after`-th step until `release` exists;
    returns them and a function that calls stop() while they are held and releases them once a rank logged
    the stop request."""
    runs = launch({"MOCA_TEST_FAULT": f"hold:{after}:{release}"})

    def stop_then_release(stop) -> None:
        _wait_for_text(runs[0], logs[0], "fault: hold after step")
        stop()
        deadline = time.time() + 120
        while not any("saving a checkpoint and stopping" in log.read_text() for log in logs):
            assert time.time() < deadline, "\n".join(log.read_text()[-2000:] for log in logs)
            time.sleep(0.2)
        release.touch()

    return runs, stop_then_release


def _saved_step(output: Path, world_size: int = 2) -> int:
    latest = output / "checkpoints" / (output / "checkpoints" / "latest").read_text().strip()
    step = json.loads((latest / "meta.json").read_text())["step"]
    for rank in range(world_size):
        assert _load(latest / f"trainer_rank{rank:05d}.pt")["step"] == step
    assert not list((output / "checkpoints").glob(".*")), "no temporary checkpoint left behind"
    return step


def _frames_of_ours(log: str) -> list[str]:
    """Traceback lines that point into moca_fast or its scripts (DeepSpeed's `deepspeed` command prints its
    own KeyboardInterrupt traceback on Ctrl-C: that one is not ours to fix)."""
    ours = [f'File "{REPO / part}' for part in ("moca_fast", "launch", "tests")]  # lines may start "[rank0]:"
    return [line for line in log.splitlines() if any(frame in line for frame in ours)]


def _sigterm_to_the_command(run: subprocess.Popen) -> None:
    run.send_signal(signal.SIGTERM)  # the `deepspeed` command only: it dies, launch.py and the ranks stay


def _sighup_to_the_group(run: subprocess.Popen) -> None:
    os.killpg(run.pid, signal.SIGHUP)  # a closed terminal: both launchers die of it, the ranks and workers get it


def _ctrl_c_twice(run: subprocess.Popen) -> None:
    os.killpg(run.pid, signal.SIGINT)  # the whole group: runner, launch.py (which forwards SIGTERM), ranks, workers
    time.sleep(0.02)
    os.killpg(run.pid, signal.SIGINT)


def test_sigterm_sighup_and_two_quick_ctrl_c_after_step_1_each_save_the_step_reached(tmp_path):
    jpegs = write_class_folders(tmp_path / "jpegs", per_class=12, classes=2)
    out = tmp_path / "run"
    data = ["--data", str(jpegs), "--output", str(out), "num_workers=1"] + FOREVER
    stopped, logs = 0, []
    for phase, stop in enumerate((_sigterm_to_the_command, _sighup_to_the_group, _ctrl_c_twice)):
        logs.append(tmp_path / f"{stop.__name__}.log")
        args = data + (["--resume", "auto"] if phase else [])
        (run,), stop_then_release = _held(lambda env: [_launch(["--num_gpus", "2", "--master_port", str(free_port())],
                                                               args, logs[-1], FAULT_LAUNCH, env)],
                                          logs[-1:], 2, tmp_path / f"release_{phase}")
        stop_then_release(lambda: stop(run))
        _wait_until_gone([run], logs[-1:])
        log, final = logs[-1].read_text(), _saved_step(out)
        assert final == _metrics(out)[-1]["step"] == stopped + 3, stop.__name__
        assert [r["step"] for r in _metrics(out)] == list(range(1, final + 1))
        assert f"stopped at step {final}; checkpoint saved" in log, log[-3000:]
        assert not _frames_of_ours(log), log[-3000:]
        if phase:
            assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
        stopped = final
    assert "the launcher deepspeed" in logs[0].read_text()
    assert "received SIGHUP: saving a checkpoint and stopping" in logs[1].read_text()
    assert "received SIGINT again: the checkpoint of the step reached is written first" in logs[2].read_text()


@pytest.mark.parametrize("fault, ranks, stop", [("slow_storage", 2, _sigterm_to_the_command),
                                                ("slow_init", 1, _ctrl_c_twice)])
def test_a_stop_before_step_1_ends_every_rank_at_once_with_one_line(tmp_path, fault, ranks, stop):
    jpegs = write_class_folders(tmp_path / "jpegs", per_class=12, classes=2)  # new: the scan decodes every file
    out, log = tmp_path / "run", tmp_path / "log"
    run = _launch(["--num_gpus", str(ranks), "--master_port", str(free_port())],
                  ["--data", str(jpegs), "--output", str(out), f"num_new_words={2 * ranks}"] + FOREVER, log,
                  FAULT_LAUNCH, {"MOCA_TEST_FAULT": fault})
    _wait_for_text(run, log, "fault: ")  # rank 0 scans (rank 1 waits in a collective), or DeepSpeed starts up
    stop(run)
    _wait_until_gone([run], [log], timeout=60)
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("stopped by")]
    assert len(said) == 1 and said[0].endswith(" before step 1: nothing to save"), text[-3000:]
    assert not _frames_of_ours(text) and "error:" not in text, text[-3000:]
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("fault", ["save_raises", "save_killed"])
def test_a_rank_dying_inside_save_checkpoint_ends_the_others_with_one_line(tmp_path, fault):
    from moca_fast.io import checkpoints

    out, log = tmp_path / "run", tmp_path / "log"
    run = _launch(["--num_gpus", "2", "--master_port", str(free_port())],
                  ["--data-backend", "synthetic", "--output", str(out), "ckpt_every=1"] + FOREVER, log, FAULT_LAUNCH,
                  {"MOCA_TEST_FAULT": f"{fault}:1:2"})  # rank 1, in the checkpoint of step 2
    _wait_for_text(run, log, "fault: save")
    _wait_until_gone([run], [log], timeout=60)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error")]
    expected = {"save_raises": re.escape("error: rank 1: PermissionError: [Errno 13] Permission denied: "
                                         "'zero_pp_rank_1_mp_rank_00_optim_states.pt'; step 1 is the last complete "
                                         f"checkpoint (traceback in {out / 'error_rank1.log'})"),
                "save_killed": r"error: rank 0: rank 1 \(pid \d+\) of this node ended without a word \(killed\?\) "
                               r"during the training loop; step 1 is the last complete checkpoint"}[fault]
    if fault == "save_killed":
        # the deepspeed launcher polls its ranks every second and SIGTERMs the others once one has died: that may
        # reach rank 0 before its collective with the dead rank fails, and then the stop is what rank 0 reports
        said = [line for line in text.splitlines() if line.startswith(("error", "stopped by"))]
        launcher_first = ("stopped by SIGTERM before the step reached could be saved; step 1 is the last complete "
                          "checkpoint")
        assert len(said) == 1 and (re.fullmatch(expected, said[0]) or said[0] == launcher_first), text[-3000:]
    else:
        assert len(errors) == 1 and re.fullmatch(expected, errors[0]), text[-3000:]
    assert not _frames_of_ours(text)
    assert checkpoints.resolve_resume("auto", out).name == "step_00000001"


def test_two_nodes_on_one_machine_stop_together_and_resume_exactly(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    end_at = 10

    def two_nodes(name: str, args: list[str], env: dict | None = None) -> tuple[list[subprocess.Popen], list[Path]]:
        port, logs = str(free_port()), [tmp_path / f"{name}.node{n}.log" for n in range(2)]
        procs = [_launch(["--hostfile", str(hosts), "--no_ssh", "--num_nodes", "2", "--node_rank", str(n),
                          "--master_addr", "127.0.0.1", "--master_port", port],
                         ["--data-backend", "synthetic", "--output", str(tmp_path / name)] + args, logs[n],
                         FAULT_LAUNCH if env else LAUNCH, env)
                 for n in range(2)]
        return procs, logs

    full, full_logs = two_nodes("full", ["--max-steps", str(end_at)])
    part_logs = [tmp_path / f"split.node{n}.log" for n in range(2)]
    part, stop_then_release = _held(lambda env: two_nodes("split", ["--max-steps", "100000"], env)[0], part_logs,
                                    2, tmp_path / "release")
    stop_then_release(lambda: part[1].send_signal(signal.SIGTERM))  # node 1's launcher: rank 1 stops, rank 0 with it
    _wait_until_gone(part, part_logs)
    stopped = _saved_step(tmp_path / "split")
    assert stopped == _metrics(tmp_path / "split")[-1]["step"] == 3 < end_at
    assert "nnodes=2, num_local_procs=1, node_rank=1" in part_logs[1].read_text(), "rank 1 is LOCAL_RANK 0 of node 1"
    for p, log in zip(full, full_logs):
        assert p.wait(timeout=240) == 0, log.read_text()[-3000:]
    resumed, resumed_logs = two_nodes("split", ["--max-steps", str(end_at), "--resume", "auto"])
    for p, log in zip(resumed, resumed_logs):
        assert p.wait(timeout=240) == 0, log.read_text()[-3000:]

    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, end_at + 1))
    for ra, rb in zip(a, b):
        assert [ra[k] for k in ("loss", "loss_img", "loss_loc", "lr", "wd", "momentum")] == \
               [rb[k] for k in ("loss", "loss_img", "loss_loc", "lr", "wd", "momentum")], ra["step"]
    name = f"step_{end_at:08d}"
    ca, cb = tmp_path / "full" / "checkpoints" / name, tmp_path / "split" / "checkpoints" / name
    files = sorted(p.name for p in (ca / "deepspeed").iterdir())
    assert files == sorted(p.name for p in (cb / "deepspeed").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"], "one model file (global rank 0), one partition per rank"
    compared = sum(_assert_identical(_load(ca / "deepspeed" / f), _load(cb / "deepspeed" / f), f) for f in files)
    for rank in range(2):
        ta, tb = _load(ca / f"trainer_rank{rank:05d}.pt"), _load(cb / f"trainer_rank{rank:05d}.pt")
        compared += _assert_identical(ta, tb, f"trainer rank {rank}")
    assert compared > 50


def _agreement_rank(rank: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from moca_fast import ending
    from moca_fast.peers import launcher_processes
    from moca_fast.train.engine import DistInfo
    from moca_fast.train.stop import StopSignal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with ending.installed() as end:
        stop = StopSignal(DistInfo(rank, 2, 0, torch.device("cpu")), end)
        end.deferred(lambda: "nothing saved")
        agreed_at = None
        for step in range(1, 10):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a launcher's forwarded copy: logged, the rank lives on
            if stop.agreed():
                agreed_at = step
                break
        stop.close()
        end.finishing()
    results[rank] = (agreed_at, launcher_processes())
    dist.destroy_process_group()


def test_the_stop_agreement_is_exact_one_step_after_the_signal():
    """The all-reduce started after step 3 (where rank 1 got SIGTERM) is read after step 4 by both ranks."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_agreement_rank, args=(free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: (4, []), 1: (4, [])}, "both stop at step 4; no launcher above a spawned rank"


def test_node_local_checkpoint_storage_is_refused():
    """With it, local rank 0 of every node would write the model file into the one shared folder."""
    from moca_fast.errors import ConfigError
    from moca_fast.train.engine import merge_user_config

    with pytest.raises(ConfigError, match="'checkpoint.use_node_local_storage' is not accepted"):
        merge_user_config({}, {"checkpoint": {"use_node_local_storage": True}})
