"""What keeps a run from being lost or silently wrong: the run-folder lock, the settings and the data a
resume may not change, the finiteness check before a checkpoint, disk-full errors, and the exit statuses.

Exit statuses of launch/train.py (README "What is guaranteed"):
  0 done, or stopped by SIGTERM/SIGINT/SIGHUP in the training loop with the step reached saved
  1 any other error (a rank that died, a failed collective, a bug): one line, traceback in a file it names
  2 a bad setting or input (ConfigError): one line naming it
  3 non-finite loss, weights or gradient norm: no checkpoint of that state is written
  4 no space left while writing a checkpoint: the partial folder is removed
  128+N stopped by signal N where there was nothing (more) to save: before step 1, or between a saved
    checkpoint and the next step (129 also when the launcher went away); the line names what is saved
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from moca_fast.errors import ConfigError

log = logging.getLogger("moca_fast.train")

EXIT_OK, EXIT_ERROR, EXIT_BAD_SETTING, EXIT_NON_FINITE, EXIT_DISK_FULL = 0, 1, 2, 3, 4
LOCK = ".lock"


def agree(ok: bool, device: torch.device) -> bool:
    """True on every rank iff `ok` is True on every rank (a collective; no rank is left waiting)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class RunLock:
    """An exclusive flock on <output>/.lock for the life of the process, holding the holder's pid."""

    def __init__(self, output: Path):
        self.path = Path(output) / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"{output} is in use by another run (pid {holder}); wait for it to end or choose "
                              f"another --output") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    __del__ = release


def lock_run_folder(output: Path, is_main: bool, device: torch.device) -> RunLock | None:
    """Rank 0 takes the lock; every rank learns whether it did (ranks sharing the folder never wait)."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = RunLock(output)
        except ConfigError as e:
            refusal = e
    if not agree(refusal is None, device):
        raise refusal or ConfigError(f"{output}: rank 0 could not lock the run folder")
    return lock


# what a field that may change on resume does, for the log
RUN_FIELD_EFFECTS = {
    "output": "checkpoints and metrics go to the new folder", "max_steps": "the run stops at the new step",
    "log_every": "metrics interval", "ckpt_every": "checkpoint interval", "eval_every": "k-NN interval",
    "keep_checkpoints": "how many checkpoints are kept", "num_workers": "loader processes (same batches)",
    "compile_blocks": "compilation only", "activation_memory_budget": "recomputation only (same numbers)",
    "cpu_threads": "intra-op threads only",
    "resume_data_change": "what a resume on other data does", "scan_cache": "where the scan's verdicts are kept",
    "photometric_on": "where the colour operations run (the same batches, but for JPEGs decoded at a reduced "
                      "DCT scale; a checkpoint older than the setting records none)",
}


def check_resume_settings(old: dict, new: dict, run_fields: tuple[str, ...]) -> None:
    """Refuses (one line, every differing field old -> new) a resume whose settings change what is
    trained or the data position; logs the allowed changes (run_fields) and what each does."""
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    refused = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ if k not in run_fields]
    if refused:
        raise ConfigError(f"the checkpoint was trained with other settings: {', '.join(refused)}; resume with "
                          f"the checkpoint's values or start a new run")
    for k in differ:
        log.info("resuming with %s %r -> %r (%s)", k, old.get(k), new.get(k), RUN_FIELD_EFFECTS.get(k, "allowed"))


def check_resume_settings_on(meta: dict, cfg, world_size: int, run_fields: tuple[str, ...]):
    """check_resume_settings against checkpoint `meta`; returns cfg, with grad_accum adjusted where the run
    resumes on another number of ranks, so that the global batch (batch_size x ranks x grad_accum) stays the
    checkpoint's. Refused in one line where it cannot stay (or cfg asks for another grad_accum)."""
    old, written_by = meta["config"], meta["world_size"]
    if written_by == world_size:
        check_resume_settings(old, cfg.to_dict(), run_fields)
        return cfg
    check_resume_settings({**old, "grad_accum": cfg.grad_accum}, cfg.to_dict(), run_fields)
    global_batch = old["batch_size"] * written_by * old["grad_accum"]
    grad_accum, partial = divmod(global_batch, cfg.batch_size * world_size)
    if partial:
        raise ConfigError(f"the checkpoint was trained with a global batch of {global_batch} (batch_size="
                          f"{old['batch_size']} x {written_by} ranks x grad_accum={old['grad_accum']}), which "
                          f"batch_size={cfg.batch_size} x {world_size} ranks does not divide: resume on a number of "
                          f"ranks that divides {global_batch // cfg.batch_size}")
    if cfg.grad_accum not in (old["grad_accum"], grad_accum):
        raise ConfigError(f"grad_accum={cfg.grad_accum} on {world_size} ranks changes the checkpoint's global batch "
                          f"of {global_batch}: leave grad_accum={old['grad_accum']} (it becomes {grad_accum} on "
                          f"{world_size} ranks)")
    log.info("resuming on %d ranks a run of %d: grad_accum %d -> %d keeps the global batch of %d", world_size,
             written_by, old["grad_accum"], grad_accum, global_batch)
    return cfg.replace(grad_accum=grad_accum)


def check_resume_data(old: dict | None, new: dict, checkpoint: Path, policy: str) -> str | None:
    """None if the data are the checkpoint's (or it recorded none: logged). Otherwise refuses the resume
    (ConfigError, one line saying what changed), or with policy "continue" returns what changed."""
    from moca_fast.data.fingerprint import describe_data_change

    if old is None:
        log.warning("checkpoint %s records no data identity (written by an older moca_fast): the data cannot be "
                    "checked against it", checkpoint)
        return None
    change = describe_data_change(old, new)
    if change is None:
        return None
    if policy != "continue":
        raise ConfigError(f"the data changed since checkpoint {checkpoint}: {change}; restore the data, or set "
                          f"resume_data_change=continue to train on the new data (the epoch length, the schedules "
                          f"and the data order change)")
    log.warning("the data changed since checkpoint %s: %s; continuing on the new data (resume_data_change=continue)",
                checkpoint, change)
    return change


def non_finite_state(engine, device: torch.device) -> str | None:
    """Why the engine's state must not be saved (non-finite weights or gradient norm), agreed over
    ranks; None if it is finite everywhere."""
    tensors = [t for t in engine.module.state_dict().values() if t.is_floating_point()]
    bad_weights = sum(int(not torch.isfinite(t).all()) for t in tensors)
    norm = engine.get_global_grad_norm()
    bad_norm = norm is not None and not torch.isfinite(torch.as_tensor(norm, dtype=torch.float64)).all()
    if agree(bad_weights == 0 and not bad_norm, device):
        return None
    if bad_weights:
        return f"{bad_weights} of {len(tensors)} weight tensors are non-finite"
    return f"the gradient norm is non-finite ({norm})" if bad_norm else "another rank's weights are non-finite"


def disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT from Python's I/O; from torch's C++ writer, which loses the errno ("unexpected
    pos ..."), any write error while the filesystem of `folder` has (almost) no space left."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        fs = os.statvfs(mount_point(folder))
    except OSError:
        return False
    free_blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail  # root may use the reserved blocks
    return free_blocks * fs.f_frsize < _NEARLY_FULL


_NEARLY_FULL = 1 << 20


def mount_point(path: Path) -> str:
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


class DiskFullError(RuntimeError):
    """No space left while writing; the message is one line."""
