"""One optimiser step on the DeepSpeed engine, and the device-side running sums of its losses.

Per micro-step: forward (the model does EMA -> teacher targets -> student -> losses, and the codebook
update) -> engine.backward -> engine.step (DeepSpeed reduces, clips and steps the optimiser on the
last micro-step). The teacher EMA and the codebook update run only on the last micro-step of an
accumulation (engine.is_gradient_accumulation_boundary()), as the official code does.
Nothing here reads a device value on the host: losses stay on the device until `LossTotals.drain`; the
engine's backward and step do, by ZeRO stage and precision (moca_fast.train.host_syncs).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moca_fast.distributed import rank_and_world


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run must stop without saving."""


class LossTotals:
    """Sums over steps of (loss, loss_img, loss_loc) and a count of non-finite losses, on the device."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, terms: torch.Tensor) -> None:
        """terms: [3] (loss, loss_img, loss_loc) of one optimiser step."""
        self.sums[:3] += terms.double()
        self.sums[3] += (~torch.isfinite(terms[0])).double()
        self.steps += 1

    def drain(self) -> dict[str, float] | None:
        """Means over the steps since the last drain, averaged over ranks (one host sync, a
        collective: every rank calls it at the same step); None if no step was added.
        Raises NonFiniteLossError on every rank if any rank saw a non-finite loss."""
        if self.steps == 0:
            return None
        sums = self.sums.clone()
        world = rank_and_world()[1]
        if world > 1:
            dist.all_reduce(sums)
        loss, img, loc, bad = sums.tolist()
        steps, self.steps = self.steps, 0
        self.sums.zero_()
        if bad > 0:
            raise NonFiniteLossError(f"the loss became non-finite ({loss / (steps * world)}) in the last {steps} "
                                     f"steps on {int(bad)} rank-step(s); stopping without saving")
        scale = 1.0 / (steps * world)
        return {"loss": loss * scale, "loss_img": img * scale, "loss_loc": loc * scale}


def optimiser_step(engine) -> None:
    """engine.step(), with a step that overflows float32 inside the optimiser (torch raises "value cannot be
    converted to type float without overflow") reported as the non-finite step it is."""
    try:
        engine.step()
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        raise NonFiniteLossError(f"the optimiser step overflowed float32 ({e}); stopping without saving") from None


def train_step(engine, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], momentum: float,
               dtype: torch.dtype, totals: LossTotals) -> torch.Tensor:
    """Runs engine.gradient_accumulation_steps() micro-steps from `batches` (one optimiser step).

    batches yields (x1, x2) float32 [B, 3, H, W] on the device; they are cast to `dtype` (the
    engine's parameter dtype). The mean over micro-steps of the loss terms, [3] (loss, loss_img,
    loss_loc) on the device, goes to `totals` and is returned. The engine's backward and step run
    in the profiler ranges "train.backward" and "train.optimizer" (python -m bench profile reads them).
    """
    accumulation = engine.gradient_accumulation_steps()
    terms = 0.0
    for _ in range(accumulation):
        try:
            x1, x2 = next(batches)
        except StopIteration:
            raise RuntimeError("the data loader ended before the len() it announced") from None
        last = engine.is_gradient_accumulation_boundary()
        loss, parts = engine(x1.to(dtype), x2.to(dtype), momentum=momentum, update_teacher=last)
        with record_function("train.backward"):
            engine.backward(loss)
        with record_function("train.optimizer"):
            optimiser_step(engine)
        terms = terms + torch.stack([loss.detach(), parts["img"], parts["loc"]]).float() / accumulation
    totals.add(terms)
    return terms
