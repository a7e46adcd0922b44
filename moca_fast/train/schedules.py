"""Per-iteration schedules (lr, weight decay, teacher momentum) and the four optimiser parameter groups.

Semantics of the official valeoai/MOCA main_pretrain.py / util/misc.py, evaluated at a fractional
epoch e = epoch + step_in_epoch / steps_per_epoch at the start of every optimiser step:
- lr: linear warm-up 0 -> lr over warmup_epochs, then a half-cosine lr -> 0 reaching 0 at
  int(epochs * lr_epochs_mul) (the official int()), so a run with lr_epochs_mul > 1 ends above 0;
- weight decay (decay group only, not the generators): half-cosine weight_decay -> weight_decay_end
  over `epochs`;
- teacher momentum: half-cosine momentum_start -> 1 over `epochs` (constant if not momentum_cosine);
- the prototype generators: constant lr_wgen and weight_decay_wgen.
No weight decay on biases and on tensors with ndim <= 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from moca_fast.config import Config
from moca_fast.errors import ConfigError

GROUP_NAMES = ("no_decay", "decay", "wgen_no_decay", "wgen_decay")


def half_cosine(start: float, end: float, epoch: float, num_epochs: float) -> float:
    """start at epoch 0 -> end at num_epochs along half a cosine period."""
    return end - 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs)) * (end - start)


def effective_batch_size(cfg: Config, world_size: int) -> int:
    return cfg.batch_size * cfg.grad_accum * world_size


def peak_lr(cfg: Config, world_size: int) -> float:
    """cfg.lr, or blr * effective batch / 256."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch_size(cfg, world_size) / 256


@dataclass(frozen=True)
class Schedules:
    lr: float
    lr_epochs: int
    warmup_epochs: float
    epochs: int
    weight_decay: float
    weight_decay_end: float
    lr_wgen: float
    weight_decay_wgen: float
    momentum_start: float
    momentum_cosine: bool

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "Schedules":
        lr_epochs = int(cfg.epochs * cfg.lr_epochs_mul)
        if cfg.warmup_epochs > lr_epochs:
            raise ConfigError(f"warmup_epochs={cfg.warmup_epochs} exceeds the lr schedule's "
                              f"int(epochs * lr_epochs_mul) = {lr_epochs} epochs")
        return cls(lr=peak_lr(cfg, world_size), lr_epochs=lr_epochs, warmup_epochs=cfg.warmup_epochs,
                   epochs=cfg.epochs, weight_decay=cfg.weight_decay, weight_decay_end=cfg.weight_decay_end,
                   lr_wgen=cfg.lr_wgen, weight_decay_wgen=cfg.weight_decay_wgen,
                   momentum_start=cfg.momentum_start, momentum_cosine=cfg.momentum_cosine)

    def learning_rate(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        if epoch > self.lr_epochs:
            return 0.0
        return half_cosine(self.lr, 0.0, epoch - self.warmup_epochs, self.lr_epochs - self.warmup_epochs)

    def weight_decay_at(self, epoch: float) -> float:
        return half_cosine(self.weight_decay, self.weight_decay_end, epoch, self.epochs)

    def momentum(self, epoch: float) -> float:
        if not self.momentum_cosine:
            return self.momentum_start
        return half_cosine(self.momentum_start, 1.0, epoch, self.epochs) if epoch <= self.epochs else 1.0

    def group_values(self, epoch: float) -> dict[str, tuple[float, float]]:
        """{group name: (lr, weight_decay)} at fractional epoch `epoch`."""
        lr, wd = self.learning_rate(epoch), self.weight_decay_at(epoch)
        return {"no_decay": (lr, 0.0), "decay": (lr, wd),
                "wgen_no_decay": (self.lr_wgen, 0.0), "wgen_decay": (self.lr_wgen, self.weight_decay_wgen)}


def parameter_groups(model: nn.Module, generator_prefixes: tuple[str, ...]) -> list[dict]:
    """Trainable parameters split into the non-empty groups of GROUP_NAMES (each dict has a "name")."""
    groups: dict[str, list] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "no_decay" if param.ndim <= 1 or name.endswith(".bias") else "decay"
        if name.startswith(generator_prefixes):
            key = "wgen_" + key
        groups[key].append(param)
    return [{"name": name, "params": params, "lr": 0.0, "weight_decay": 0.0}
            for name, params in groups.items() if params]


def apply_schedules(param_groups: list[dict], schedules: Schedules, epoch: float) -> None:
    """Sets lr and weight_decay of every named group for fractional epoch `epoch` (host floats only)."""
    values = schedules.group_values(epoch)
    for group in param_groups:
        group["lr"], group["weight_decay"] = values[group["name"]]
