"""What a run writes besides checkpoints (rank 0 only): env.json, metrics.jsonl, TensorBoard
scalars (when tensorboard is installed), and a progress bar (a log line per interval when stderr
is not a terminal)."""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import logging
import platform
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

from moca_fast.figures.tensorboard import tensorboard_writer

log = logging.getLogger("moca_fast.train")

VERSIONED_PACKAGES = ("torch", "deepspeed", "triton", "torchvision", "numpy", "PIL", "nvidia.dali", "xformers",
                      "timm", "moca_fast")


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", None) or importlib.metadata.version(name)
        except Exception:  # absent or broken optional package: recorded as None
            versions[name] = None
    return versions


def write_env_json(path: Path, **run_facts) -> dict:
    """Versions, hardware and the run's resolved choices (attention backend, impl, data backend...)."""
    env = {
        "versions": package_versions(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "hostname": socket.gethostname(),
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **run_facts,
    }
    path.write_text(json.dumps(env, indent=1, default=str))
    return env


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop the earlier records of those steps
    (and a line cut short by a crash)."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class RunLog:
    """Rank 0's metrics sink. On other ranks every method is a no-op."""

    def __init__(self, output: Path, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.total_steps = total_steps
        self._last = (time.perf_counter(), start_step)
        self.bar = self.tensorboard = self._metrics = None
        if not is_main:
            return
        _drop_records_after(output / "metrics.jsonl", start_step)
        self._metrics = open(output / "metrics.jsonl", "a")
        self.tensorboard = tensorboard_writer(output / "tensorboard")
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=None, mininterval=1.0, file=sys.stderr)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, record: dict) -> None:
        """One metrics.jsonl object (must hold "step"); also TensorBoard and the bar / a log line."""
        if not self.is_main:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        step = record["step"]
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, step)
        shown = {k: record[k] for k in ("loss", "loss_img", "loss_loc", "lr", "img_per_s") if k in record}
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif "loss" in record:
            now = time.perf_counter()
            seconds_per_step = (now - self._last[0]) / max(step - self._last[1], 1)
            self._last = (now, step)
            eta = datetime.timedelta(seconds=round(seconds_per_step * (self.total_steps - step)))
            log.info("step %d/%d epoch %.3f %s eta %s", step, self.total_steps, record.get("epoch", 0.0),
                     " ".join(f"{k}={v:.4g}" for k, v in shown.items()), eta)
        else:
            log.info("step %d %s", step, " ".join(f"{k}={v}" for k, v in record.items() if k != "step"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._metrics is not None:
            self._metrics.close()


#: the name of the one root handler setup_logging makes (and replaces when called again)
LOG_HANDLER = "moca_fast"


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to sys.stderr as it is when a record comes, not as it was when the handler was
    made (a stream kept from then may be closed since: a redirected or captured stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the current sys.stderr is always used
        pass


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere, to the current sys.stderr in one format; DeepSpeed's chatter at
    warning level. Touches only the handlers it made and DeepSpeed's own (any other handler stays).

    DeepSpeed's logger comes with its own handler, bound to the sys.stdout of the moment deepspeed was
    imported; it is removed, so DeepSpeed's lines go where ours go.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == LOG_HANDLER]:
        root.removeHandler(handler)
    handler = _CurrentStderr()
    handler.set_name(LOG_HANDLER)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    deepspeed_log = logging.getLogger("DeepSpeed")
    deepspeed_log.setLevel(logging.WARNING)
    for handler in [h for h in deepspeed_log.handlers if type(h) is logging.StreamHandler]:  # DeepSpeed's own
        deepspeed_log.removeHandler(handler)
    deepspeed_log.propagate = True
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
