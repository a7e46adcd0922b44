"""The training run: set-up, the optimiser-step loop, logging, checkpoints, k-NN evaluation, stop.

Every rank runs `train`; collectives (the model's codebook/dist_norm sync, metric drains, stop
agreement, checkpoints, k-NN) happen at the same steps on all ranks.
Step counting: `step` = optimiser steps done; an epoch has len(loader) // grad_accum steps; the
schedules are evaluated at epoch + micro-batches done / len(loader) (the official epoch_float).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moca_fast import ending
from moca_fast.config import Config, save_config
from moca_fast.cpu_threads import set_intra_op_threads
from moca_fast.errors import ConfigError
from moca_fast.io import checkpoints
from moca_fast.train import checkpoint as ckpt
from moca_fast.train.engine import (DistInfo, barrier, build_engine, deepspeed_config, init_distributed, input_dtype,
                                    resolve_precision)
from moca_fast.figures.training import log_eval_figures, write_run_figures
from moca_fast.train.input_wait import InputWait
from moca_fast.train.run_guard import check_resume_data, check_resume_settings_on, lock_run_folder, non_finite_state
from moca_fast.train.run_log import RunLog, read_random_init, setup_logging, write_env_json
from moca_fast.train.schedules import Schedules, apply_schedules, effective_batch_size
from moca_fast.train.step import LossTotals, NonFiniteLossError, train_step
from moca_fast.train.stop import StopSignal

log = logging.getLogger("moca_fast.train")

RUN_FIELDS = ("output", "max_steps", "log_every", "ckpt_every", "eval_every", "keep_checkpoints", "num_workers",
              "compile_blocks", "activation_memory_budget", "cpu_threads", "resume_data_change", "photometric_on",
              "scan_cache")
#: a checkpoint that takes longer than this may not finish within the 30 s the deepspeed launcher waits
#: between forwarding a stop signal and SIGKILL (the previous checkpoint then stays the latest)
SLOW_SAVE_S = 15.0


def _rng_isolated(batches):
    """The loader's batches, drawn without touching the global CPU RNG (DataLoader draws a base seed
    from it when an iteration starts: a resumed run would otherwise shift every later mask)."""
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(batches)
            except StopIteration:
                return
        yield batch


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class KnnData:
    train: str
    val: str


def _knn_data(cfg: Config) -> KnnData | None:
    if cfg.knn_train and cfg.knn_val:
        return KnnData(cfg.knn_train, cfg.knn_val)
    return None


def _with_demo_data(cfg: Config, dist_info: DistInfo) -> Config:
    """cfg.data None: the embedded demo set (written by rank 0 first), with its k-NN folders
    (not for the synthetic backend, which reads no files)."""
    if cfg.data is not None or cfg.data_backend == "synthetic":
        return cfg
    from moca_fast.data.demo import prepare_demo

    if dist_info.is_main:
        prepare_demo()
    barrier()
    demo = prepare_demo()
    return cfg.replace(knn_train=cfg.knn_train or demo.knn_train, knn_val=cfg.knn_val or demo.knn_val)


def _situation(text: str) -> None:
    """What an immediate stop of this process leaves saved, for its line (see moca_fast.ending)."""
    current = ending.current()
    if current is not None:
        current.immediate(text)


def _saved_at(step: int) -> str:
    return f"step {step} is saved, continue with --resume auto"


def _fast_path_facts(model) -> dict | None:
    """The fast-path pieces applied to the model (moca_fast.model.fastpath), or None."""
    options = getattr(model, "fast_options", None)
    return asdict(options) if options is not None else None


class Trainer:
    # ------------------------------------------------------------------ set-up
    def __init__(self, cfg: Config, resume: str | None = None, deepspeed_config_path: str | None = None):
        self.dist = init_distributed()
        setup_logging(self.dist.is_main)
        cfg = cfg.validate(self.dist.world_size).check_paths()
        self.precision = resolve_precision(cfg, self.dist.device)
        self.ds_config = deepspeed_config(cfg, self.dist.world_size, self.precision, deepspeed_config_path)
        self.threads = set_intra_op_threads(cfg.cpu_threads, 0 if cfg.data_backend == "synthetic" else cfg.num_workers)
        cfg = _with_demo_data(cfg, self.dist)
        self.output = Path(cfg.output)
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        barrier()
        self.resume_from = checkpoints.resolve_resume(resume, self.output)
        self.resume_meta = None
        if self.resume_from is not None:  # read-only so far: the lock is taken once nothing refuses the run
            self.resume_meta = checkpoints.read_meta(self.resume_from)
            _situation(f"before step {self.resume_meta['step'] + 1}: {_saved_at(self.resume_meta['step'])}")
            cfg = check_resume_settings_on(self.resume_meta, cfg, self.dist.world_size, RUN_FIELDS)
            if cfg.grad_accum != self.ds_config["gradient_accumulation_steps"]:  # on another number of ranks
                self.ds_config = deepspeed_config(cfg, self.dist.world_size, self.precision, deepspeed_config_path)
        self.cfg = cfg
        self.lock = lock_run_folder(self.output, self.dist.is_main, self.dist.device)
        try:
            self._set_up(cfg)
        except BaseException:  # a refused run leaves the folder free at once (not when the Trainer is collected)
            if self.lock is not None:
                self.lock.release()
            raise

    def _set_up(self, cfg: Config) -> None:
        """The engine, the loader and the run's extent, checked against the checkpoint to resume from."""
        self.dtype = input_dtype(self.precision)

        from moca_fast.data import build_train_loader
        from moca_fast.model.moca import MOCA

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.engine, _ = build_engine(MOCA(cfg, self.dist.world_size), cfg, self.dist, self.precision, self.ds_config)
        self.model = self.engine.module
        if cfg.impl == "fast" and self.dist.device.type == "cuda":  # no silent fallback: stop before step 1
            from moca_fast.model.selfcheck import check_fused_ops

            check_fused_ops(cfg, self.dist.device, self.dtype)
        _seed_everything(cfg.seed + self.dist.rank)
        self.loader = build_train_loader(cfg, self.dist.rank, self.dist.world_size, self.dist.device)
        self.steps_per_epoch, unused = divmod(len(self.loader), cfg.grad_accum)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"an epoch has {len(self.loader)} batches per rank, "
                              f"fewer than grad_accum={cfg.grad_accum}")
        if unused and self.dist.is_main:
            log.info("an epoch has %d batches per rank and grad_accum=%d: the last %d batch(es) of every epoch are "
                     "not used (%d optimiser steps per epoch)", len(self.loader), cfg.grad_accum, unused,
                     self.steps_per_epoch)
        self.data_change = None
        if self.resume_from is not None:
            self.data_change = check_resume_data(self.resume_meta.get("data"), self.loader.identity,
                                                 self.resume_from, cfg.resume_data_change)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedules = Schedules.from_config(cfg, self.dist.world_size)
        self.knn = _knn_data(cfg)
        self.knn_loaders = None  # built (the folders scanned) once per run, at the first k-NN evaluation
        self.step = 0
        self.last_saved = -1
        self.skipped_reported = 0
        self.slow_save_reported = False
        self.input_wait = InputWait()

    def _meta(self) -> dict:
        return {"world_size": self.dist.world_size, "precision": self.precision, "epoch": self.epoch_float(),
                "steps_per_epoch": self.steps_per_epoch, "data": self.loader.identity, "config": self.cfg.to_dict()}

    def _write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        save_config(self.cfg, self.output / "config.yaml")
        write_env_json(self.output / "env.json", world_size=self.dist.world_size, device=str(self.dist.device),
                       precision=self.precision, zero_stage=self.ds_config["zero_optimization"]["stage"],
                       attention_backend=self.model.attention_backend, kernel_impl=self.cfg.impl,
                       fast_path=_fast_path_facts(self.model),
                       cpu_threads=asdict(self.threads),
                       data_backend=self.loader.backend, train_images=self.loader.num_images,
                       skipped_images=len(self.loader.skipped), steps_per_epoch=self.steps_per_epoch,
                       total_steps=self.total_steps, effective_batch_size=effective_batch_size(
                           self.cfg, self.dist.world_size), deepspeed_config=self.ds_config)

    def _restore(self) -> dict | None:
        """Loads the checkpoint to resume from; returns its RNG states (restored just before training)."""
        if self.resume_from is None:
            return None
        state = ckpt.load_checkpoint(self.engine, self.resume_from, self.dist.world_size)
        self.step = self.last_saved = state["step"]
        written_by = self.resume_meta["world_size"]
        if self.data_change is None:  # a checkpoint older than the global position: its world size's batches
            self.loader.load_state_dict({"samples": state["loader"]["step"] * self.cfg.batch_size * written_by,
                                         **state["loader"]})
        else:
            self._continue_on_new_data()
        log.info("resumed from %s at step %d", self.resume_from, self.step)
        if written_by != self.dist.world_size and self.dist.is_main:
            new_ranks = (f"; ranks {written_by} to {self.dist.world_size - 1} start their random generators from "
                         f"seed + rank" if self.dist.world_size > written_by else "")
            log.warning("resumed on %d ranks a run of %d: the same global batch, schedules and sample order, the "
                        "optimiser state re-sliced; the codebook takes %d new words per step from now on (as a run "
                        "started on %d ranks)%s", self.dist.world_size, written_by,
                        self.cfg.words_per_step(self.dist.world_size), self.dist.world_size, new_ranks)
        return state["rng"]

    def _continue_on_new_data(self) -> None:
        """resume_data_change=continue: the step count goes on; the epoch, the schedules and the data position
        follow from it and the new epoch length (logged)."""
        cfg, meta = self.cfg, self.resume_meta
        old_steps_per_epoch, old_epoch, new_epoch = meta["steps_per_epoch"], meta["epoch"], self.epoch_float()
        (old_lr, old_wd), (new_lr, new_wd) = (self.schedules.group_values(e)["decay"] for e in (old_epoch, new_epoch))
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        self.loader.load_state_dict({"epoch": epoch, "step": in_epoch * cfg.grad_accum})
        log.warning("continuing on the new data at step %d: an epoch has %d optimiser steps instead of %d (%d steps "
                    "in the %d epochs instead of %d); step %d is epoch %.4f instead of %.4f, so lr %.4g -> %.4g, weight "
                    "decay %.4g -> %.4g, teacher momentum %.6f -> %.6f; data order: epoch %d goes on at its batch %d "
                    "of a new permutation of the %d images (images already seen in this epoch may come again, others "
                    "not at all)", self.step, self.steps_per_epoch, old_steps_per_epoch,
                    cfg.epochs * self.steps_per_epoch, cfg.epochs, cfg.epochs * old_steps_per_epoch, self.step,
                    new_epoch, old_epoch, old_lr, new_lr, old_wd, new_wd, self.schedules.momentum(old_epoch),
                    self.schedules.momentum(new_epoch), epoch, in_epoch * cfg.grad_accum, self.loader.num_images)

    # ------------------------------------------------------------------ pieces
    def epoch_float(self) -> float:
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        return epoch + in_epoch * self.cfg.grad_accum / len(self.loader)

    def knn_accuracy(self) -> dict:
        from moca_fast.probes.knn import build_knn_loaders, knn_accuracy

        with torch.random.fork_rng(devices=[]):
            if self.knn_loaders is None:
                self.knn_loaders = build_knn_loaders(self.cfg, self.knn.train, self.knn.val, self.dist.rank,
                                                     self.dist.world_size, self.dist.device)
            return knn_accuracy(self.model, *self.knn_loaders, k=self.cfg.knn_k,
                                temperature=self.cfg.knn_temperature, dtype=self.dtype)

    def save(self, run_log: RunLog, totals: LossTotals, interval: dict) -> None:
        """A checkpoint of the current step; the losses are drained and the weights and gradient norm
        checked first (raises NonFiniteLossError: no checkpoint of a non-finite state)."""
        self.flush(run_log, totals, interval)
        problem = non_finite_state(self.engine, self.dist.device)
        if problem is not None:
            raise NonFiniteLossError(f"{problem} at step {self.step}; stopping without saving")
        trainer_state = {"step": self.step, "loader": self.loader.state_dict()}
        started = time.perf_counter()
        ckpt.save_checkpoint(self.engine, self.output, self.step, trainer_state, self._meta(),
                             self.cfg.keep_checkpoints)
        self.last_saved = self.step
        seconds = time.perf_counter() - started
        log.info("checkpoint step %d written in %.1f s", self.step, seconds)
        if seconds > SLOW_SAVE_S and not self.slow_save_reported:
            self.slow_save_reported = True
            log.warning("a checkpoint took %.0f s to write: the deepspeed launcher SIGKILLs the ranks 30 s after it "
                        "forwards a stop signal, so a stopped run may lose the steps since its previous checkpoint "
                        "(which stays complete); a smaller ckpt_every loses fewer", seconds)

    def flush(self, run_log: RunLog, totals: LossTotals, interval: dict) -> None:
        """Drains the device-side loss sums into one metrics record, every log_every steps: the loop's only host
        sync between checkpoints and evaluations. DeepSpeed's optimiser step adds its own every step, by ZeRO
        stage and precision (0 to 9 on a GPU: moca_fast.train.host_syncs)."""
        means = totals.drain()
        if means is None:
            return
        now = time.perf_counter()
        steps = self.step - interval["step"]
        img_per_s = steps * effective_batch_size(self.cfg, self.dist.world_size) / (now - interval["time"])
        record = {"step": self.step, "epoch": round(self.epoch_float(), 6), **means, **interval["values"],
                  "img_per_s": img_per_s,
                  "input_wait": self.input_wait.interval_share(now - interval["time"], img_per_s)}
        run_log.write(record)
        interval.update(step=self.step, time=now)
        if self.engine.skipped_steps > self.skipped_reported:  # DeepSpeed's overflow skips (inf/NaN gradients)
            log.warning("DeepSpeed skipped %d optimiser step(s) so far (gradient overflow)", self.engine.skipped_steps)
            self.skipped_reported = self.engine.skipped_steps

    # ------------------------------------------------------------------ run
    def train(self) -> dict:
        try:
            with ending.installed() as end:  # the entry point's own (launch/train.py), else one for this call
                return self._train(end)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self, end: ending.Ending) -> dict:
        rng = self._restore()
        self._write_run_files()
        if self.knn is not None and self.resume_from is None:
            random_init = self.knn_accuracy()
            log.info("k-NN of the random-init teacher: top-1 %.2f %%", random_init["top1"])
            if self.dist.is_main:
                ckpt.write_atomic(self.output / "knn_random_init.json", json.dumps(random_init, indent=1))
        if rng is not None:
            ckpt.restore_rng(rng)
        run_log = RunLog(self.output, self.dist.is_main, self.total_steps, self.step)
        totals = LossTotals(self.dist.device)
        stop = StopSignal(self.dist, end)
        interval = {"step": self.step, "time": time.perf_counter(), "values": {}}
        stopped = False
        try:
            while self.step < self.total_steps and not stopped:
                stopped = self._epoch(run_log, totals, stop, interval, end)
            if self.last_saved != self.step:
                self.save(run_log, totals, interval)
            stop.close()
        finally:
            run_log.close()
        result = {"step": self.step, "stopped_by_signal": stopped, "skipped_steps": self.engine.skipped_steps}
        if not stopped and self.knn is not None:
            end.immediate(f"during the final k-NN evaluation: training is done and step {self.step} is saved")
            result.update(self._final_eval())
        end.finishing()
        barrier()  # no rank's watcher reads rank 0's store after rank 0 has ended
        return result

    def _epoch(self, run_log: RunLog, totals: LossTotals, stop: StopSignal, interval: dict, end: ending.Ending) -> bool:
        """Runs the optimiser steps left in the current epoch (up to total_steps); True if stopped."""
        cfg = self.cfg
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        self.loader.set_epoch(epoch)
        position = self.loader.state_dict()
        if (position["epoch"], position["step"]) != (epoch, in_epoch * cfg.grad_accum):
            raise RuntimeError(f"data loader at {position}, trainer at epoch {epoch} step {in_epoch}")
        batches = self.input_wait.timed(iter(self.loader))
        try:
            for _ in range(in_epoch, self.steps_per_epoch):
                epoch_float = self.epoch_float()
                apply_schedules(self.engine.optimizer.param_groups, self.schedules, epoch_float)
                momentum = self.schedules.momentum(epoch_float)
                train_step(self.engine, _rng_isolated(batches), momentum, self.dtype, totals)
                self.step += 1
                if end.mode != ending.DEFERRED:  # a step to save from now on: a stop is agreed at a step and saved
                    end.deferred(lambda: checkpoints.last_complete(self.output))
                run_log.advance()
                lr, wd = self.schedules.group_values(epoch_float)["decay"]
                interval["values"] = {"lr": lr, "wd": wd, "lr_wgen": self.schedules.lr_wgen, "momentum": momentum}
                if self.step % cfg.log_every == 0:
                    self.flush(run_log, totals, interval)
                stopping = stop.agreed()
                if stopping or self.step % cfg.ckpt_every == 0:
                    self.save(run_log, totals, interval)
                if stopping:
                    return True
                if self.step >= self.total_steps:
                    break
        finally:
            batches.close()
        epoch_done = self.step % self.steps_per_epoch == 0
        periodic = cfg.eval_every and (self.step // self.steps_per_epoch) % cfg.eval_every == 0
        if epoch_done and periodic and self.knn is not None and self.step < self.total_steps:
            if self.last_saved != self.step:  # so that a stop during the evaluation ends it at once, losing nothing
                self.save(run_log, totals, interval)
            end.immediate(f"during the k-NN evaluation after step {self.step}: {_saved_at(self.step)}")
            result = self.knn_accuracy()
            end.immediate(f"before step {self.step + 1}: {_saved_at(self.step)}")
            run_log.write({"step": self.step, "epoch": round(self.epoch_float(), 6),
                           "knn_top1": result["top1"], "knn_top5": result["top5"]})
            log_eval_figures(run_log.tensorboard, self.model, self.knn.val, self.step, self.dtype)
        return False

    def _final_eval(self) -> dict:
        final = self.knn_accuracy()
        random_init = read_random_init(self.output / "knn_random_init.json")
        result = {"knn_top1": final["top1"], "knn_top5": final["top5"],
                  "knn_top1_random_init": random_init.get("top1"), "knn_top5_random_init": random_init.get("top5"),
                  "step": self.step, "k": final["k"], "temperature": final["temperature"],
                  "train_images": final["train_images"], "val_images": final["val_images"]}
        if self.dist.is_main:
            ckpt.write_atomic(self.output / "eval.json", json.dumps(result, indent=1))
            write_run_figures(self.output, self.model, self.knn.val, self.step, self.dtype)
        return result
