"""Host synchronisations of the optimiser path (engine.backward + engine.step) per ZeRO stage and precision, counted
on the real DeepSpeed engine (gloo, one CPU rank, tiny preset) as moca_fast.train.host_syncs documents them: device
values read on the host (aten::_local_scalar_dense: .item(), bool(), float() of a tensor) and the accelerator's
device-wide synchronize. torch AdamW's step counters are not counted: without fused=True (the trainer's CUDA
setting) they are host tensors. The synchronize inside DeepSpeed's overlap_comm branches is not reachable on the
CPU accelerator (it resolves data dependencies itself): the generated config's overlap_comm=False is checked."""
import os
import random

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from moca_fast.config import load_config
from moca_fast.distributed import free_port

COMBOS = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]
#: the tiny preset at 4 x 4 patches, 2 image pairs (bench/throughput.py --small): seconds per engine
SMALL = dict(img_size=32, skip_offset=1, batch_size=2, num_new_words=2)


def expected_syncs(stage: int, precision: str, groups: int) -> int:
    """host_syncs' table, per optimiser step."""
    if stage == 0:
        return 0 if precision == "fp32" else 1 + 2 * groups
    return 1 + groups + (precision == "bf16")


class HostSyncs(TorchDispatchMode):
    """Counts device values read on the host, except the tensors in `host_tensors` (by storage)."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.host = {t.untyped_storage().data_ptr() for t in host_tensors}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and \
                args[0].untyped_storage().data_ptr() not in self.host:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _engine(stage, precision, info, user=None, seed=0):
    """ZeRO 2 (gradients reduced at every micro-step) with gradient accumulation 2, the others without."""
    from moca_fast.model.moca import MOCA
    from moca_fast.train.engine import build_engine, generate_deepspeed_config, merge_user_config

    cfg = load_config("tiny", overrides=dict(SMALL, zero_stage=stage, grad_accum=2 if stage == 2 else 1))
    ds_config = generate_deepspeed_config(cfg, info.world_size, precision)
    if user is not None:
        ds_config = merge_user_config(ds_config, user)
    torch.manual_seed(seed)
    engine, ds_config = build_engine(MOCA(cfg, info.world_size), cfg, info, precision, ds_config)
    for g in engine.optimizer.param_groups:
        g["lr"] = 1e-3
    return engine, ds_config


def _optimizer_steps(engine, precision, steps, seed=1, poison_step=None):
    """Runs `steps` optimiser steps; returns the host syncs of engine.backward + engine.step over the last one's
    micro-steps (the first step's include the optimiser's lazy set-up; the timer syncs from the third).
    poison_step: that step's gradients get a NaN."""
    from deepspeed.accelerator import get_accelerator

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(seed)
    accelerator = type(get_accelerator())
    synchronize = accelerator.synchronize
    device_syncs = []
    accelerator.synchronize = lambda self, device_index=None: device_syncs.append(1)
    try:
        for step in range(steps):
            counted = step == steps - 1
            steps_counters = [s["step"] for s in engine.basic_optimizer.state.values() if "step" in s]
            mode = HostSyncs(steps_counters)
            device_syncs.clear()
            torch.manual_seed(100 + step)  # masks and codebook draws
            random.seed(100 + step)  # the codebook's choice of view
            for _ in range(engine.gradient_accumulation_steps()):
                x1, x2 = torch.randn(2, SMALL["batch_size"], 3, 32, 32, generator=g).to(dtype)
                loss, _ = engine(x1, x2, momentum=0.99, update_teacher=engine.is_gradient_accumulation_boundary())
                with mode:
                    engine.backward(loss)
                if step == poison_step:
                    next(p for p in engine.module.encoder.parameters() if p.grad is not None).grad[0] = float("nan")
                with mode:
                    engine.step()
    finally:
        accelerator.synchronize = synchronize
    return mode.count + (len(device_syncs) if counted else 0)


def _state(engine):
    return ([t.clone() for t in engine.module.state_dict().values()],
            [p.clone() for group in engine.optimizer.optimizer.param_groups for p in group["params"]])


def _main(rank, port, results):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from moca_fast.train.engine import init_distributed

    info = init_distributed()
    for stage, precision in COMBOS:
        engine, ds_config = _engine(stage, precision, info)
        results[(stage, precision)] = (_optimizer_steps(engine, precision, 2), len(engine.optimizer.param_groups),
                                       type(engine.optimizer).__name__, ds_config)
    timed, _ = _engine(0, "fp32", info, user={"timers": {"throughput": {"enabled": True}}})
    results["timer on"] = _optimizer_steps(timed, "fp32", 3)
    # ZeRO 0 bf16: the batched overflow check against DeepSpeed's own, through a step with a NaN gradient
    states = []
    for batched in (True, False):
        engine, _ = _engine(0, "bf16", info)
        if not batched:
            del engine.optimizer.overflow_checker.has_overflow  # back to DeepSpeed's method
        results[("syncs", batched)] = _optimizer_steps(engine, "bf16", 2, poison_step=0)
        results[("skipped", batched)] = engine.skipped_steps
        states.append(_state(engine))
    (module_a, masters_a), (module_b, masters_b) = states
    results["same state"] = all(torch.equal(a, b) for a, b in zip(module_a + masters_a, module_b + masters_b))


@pytest.fixture(scope="module")
def counted():
    results = mp.Manager().dict()
    mp.spawn(_main, args=(free_port(), results), nprocs=1, join=True)
    return dict(results)


@pytest.mark.parametrize("stage,precision", COMBOS, ids=[f"zero{s}-{p}" for s, p in COMBOS])
def test_host_syncs_per_optimiser_step_are_the_documented_ones(counted, stage, precision):
    syncs, groups, optimizer, ds_config = counted[(stage, precision)]
    assert groups == 4 and optimizer == {0: {"fp32": "AdamW", "bf16": "FP16_UnfusedOptimizer"}}.get(
        stage, {}).get(precision, "DeepSpeedZeroOptimizer")
    assert syncs == expected_syncs(stage, precision, groups), (stage, precision, syncs)
    assert ds_config["timers"] == {"throughput": {"enabled": False}}
    assert stage == 0 or ds_config["zero_optimization"]["overlap_comm"] is False


def test_the_counter_sees_deepspeed_s_throughput_timer(counted):
    """With the timer on (DeepSpeed's default), each micro-step adds its 2 device synchronisations."""
    assert counted["timer on"] == expected_syncs(0, "fp32", 4) + 2


def test_zero0_bf16_batched_overflow_check_is_one_sync_and_the_same_steps(counted):
    """DeepSpeed's own check reads one flag per parameter tensor (tiny: 72); the batched one reads one, and the
    run, a NaN-gradient step skipped by both included, is the same bit for bit."""
    assert counted[("syncs", True)] == expected_syncs(0, "bf16", 4)
    assert counted[("syncs", False)] == expected_syncs(0, "bf16", 4) + 72
    assert counted[("skipped", True)] == counted[("skipped", False)] == 1
    assert counted["same state"]
