"""The optimiser state in one file that does not depend on the number of ranks (a resume on another one).

DeepSpeed's ZeRO 1/2 optimiser (and its BF16_Optimizer, where DeepSpeed picks it) keeps on each rank a slice of
the flat fp32 master weights and of the Adam moments; its checkpoint has one such file per rank and loads only
on the same number of ranks. So at every checkpoint the whole fp32 master weight and Adam moments of each parameter are
gathered (DeepSpeed's safe_get_full_* API, a collective) and rank 0 writes them by parameter name, with Adam's
step count per group, to FILE. A resume on another number of ranks loads the module from DeepSpeed's files and
writes this rank's new slices from FILE, as DeepSpeed's universal-checkpoint loader does from its one folder per
parameter (deepspeed.checkpoint.universal_checkpoint), but in memory and with no conversion step.
ZeRO 0 keeps no slices (fp32: torch's AdamW; bf16: FP16_UnfusedOptimizer with whole fp32 masters): its whole
optimiser state is in DeepSpeed's model file, which DeepSpeed loads on any number of ranks (not tested here).
"""
from __future__ import annotations

from pathlib import Path

import torch

from moca_fast.errors import ConfigError
from moca_fast.distributed import rank_and_world

FILE = "optimizer_full.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def sliced_groups(engine) -> list[list[torch.nn.Parameter]] | None:
    """The model parameters of each optimiser group where the optimiser keeps per-rank slices of their fp32
    state (ZeRO 1/2, or bf16); None where it keeps it whole."""
    for attr in ("bit16_groups", "bf16_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups is not None:
            return groups
    return None


def gather_full_state(engine) -> dict | None:
    """Collective (every rank calls it). On rank 0, {"params": {name: {"fp32", "exp_avg", "exp_avg_sq"}: fp32
    CPU tensors of the parameter's shape}, "steps": [Adam's step count per optimiser group]}; None on the
    other ranks and where the optimiser keeps its state whole."""
    from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param,
                                 safe_get_full_optimizer_state)

    groups = sliced_groups(engine)
    if groups is None:
        return None
    inner = engine.optimizer.optimizer
    # DeepSpeed 0.19.8 links each parameter to its moments once, after the first group's first step, when the
    # other groups have none yet (safe_get_full_optimizer_state then fails for them): linked again here
    for group, params in zip(inner.param_groups, groups):
        lazy_init_hp_params_optimizer_state(params, group["params"][0], inner.state)
    is_main = rank_and_world()[0] == 0
    params = {}
    for name, param in engine.module.named_parameters():
        if not hasattr(param, "_hp_mapping"):  # not trained (no optimiser state)
            continue
        full = {"fp32": safe_get_full_fp32_param(param)}
        full.update((key, safe_get_full_optimizer_state(param, key)) for key in MOMENTS)
        if is_main:
            params[name] = {key: value.detach().to("cpu", torch.float32, copy=True) for key, value in full.items()}
    steps = [float(inner.state[group["params"][0]]["step"]) for group in inner.param_groups]
    return {"params": params, "steps": steps} if is_main else None


def load_full_state(engine, state: dict, source: Path) -> None:
    """Writes this rank's slices of the fp32 master weights and Adam moments (and the step counts) from a
    gather_full_state dict into a freshly built engine, then the model weights from the masters."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    groups = sliced_groups(engine)
    inner = engine.optimizer.optimizer
    names = {id(param): name for name, param in engine.module.named_parameters()}
    missing = [names[id(p)] for group in groups for p in group if names[id(p)] not in state["params"]]
    if missing or len(state["steps"]) != len(inner.param_groups):
        raise ConfigError(f"{source} does not match this model's optimiser (missing: {', '.join(missing[:3]) or 'none'}"
                          f"; {len(state['steps'])} groups, the optimiser has {len(inner.param_groups)})")
    for group, params, step in zip(inner.param_groups, groups, state["steps"]):
        flat = group["params"][0]
        for param in params:
            mapping = param._hp_mapping
            if mapping is None:  # no part of this parameter in this rank's slice
                continue
            saved = state["params"][names[id(param)]]
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

            def piece(full: torch.Tensor) -> torch.Tensor:
                return full.flatten().narrow(0, start, numel).to(flat.device, flat.dtype)

            mapping.hp_fragment.data.copy_(piece(saved["fp32"]))
            mapping.optim_fragment = {key: piece(saved[key]).clone() for key in MOMENTS}
        map_to_flat_opt_states(flat, params, inner.state, MOMENTS)
        on_device = group.get("fused") or group.get("capturable")  # torch AdamW keeps the step there
        inner.state[flat]["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu")
    engine.optimizer.update_lp_params()
