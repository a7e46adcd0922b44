"""launch/train.py with one fault injected ($MOCA_TEST_FAULT), for the tests of stops and errors; each fault
prints `fault: <what>` when it strikes, so that a test can wait for that moment:

  slow_storage              every image takes 30 s to open (a data scan on slow network storage)
  slow_init                 deepspeed.initialize takes 120 s (a slow DeepSpeed start-up)
  save_raises:RANK:N        rank RANK raises PermissionError inside DeepSpeed's save_checkpoint of checkpoint N
  save_killed:RANK:N        rank RANK is SIGKILLed there instead (as by the OOM killer)
  hold:K:FILE               every rank waits after the K-th optimiser step of this run (before the stop
                            agreement of that step) until FILE exists: a stop test sends its signal while the run
                            is held there, waits for the run to log the request, then creates FILE, so the stop
                            takes effect at step start + K + 1 however fast the machine is
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _strike(what: str) -> None:
    print(f"fault: {what}", flush=True)


def _slow(module, name: str, seconds: float, what: str) -> None:
    real = getattr(module, name)

    def slow(*args, **kwargs):
        _strike(what)
        time.sleep(seconds)
        return real(*args, **kwargs)

    setattr(module, name, slow)


def _in_save(rank: str, nth: str, fail) -> None:
    if os.environ.get("RANK", "0") != rank:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    real, calls = DeepSpeedEngine._save_zero_checkpoint, [0]

    def save(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            fail()
        return real(self, *args, **kwargs)

    DeepSpeedEngine._save_zero_checkpoint = save


def _raise_permission_error():
    _strike("save raises")
    raise PermissionError(13, "Permission denied", "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def _killed():
    _strike("save killed")
    os.kill(os.getpid(), signal.SIGKILL)


def _hold(after: str, release: str) -> None:
    from moca_fast.train.stop import StopSignal

    real, calls = StopSignal.agreed, [0]

    def agreed(self):
        calls[0] += 1
        if calls[0] == int(after):
            _strike(f"hold after step {after} of this run")
            while not os.path.exists(release):
                time.sleep(0.05)  # signals are handled here, as in a step
        return real(self)

    StopSignal.agreed = agreed


def main() -> None:
    kind, *args = os.environ["MOCA_TEST_FAULT"].split(":")
    if kind == "slow_storage":
        from PIL import Image

        _slow(Image, "open", 30, "slow storage")
    elif kind == "slow_init":
        import deepspeed

        _slow(deepspeed, "initialize", 120, "slow init")
    elif kind == "save_raises":
        _in_save(*args, _raise_permission_error)
    elif kind == "save_killed":
        _in_save(*args, _killed)
    elif kind == "hold":
        _hold(args[0], ":".join(args[1:]))
    else:
        raise SystemExit(f"unknown fault {kind}")
    sys.argv[0] = str(REPO / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
