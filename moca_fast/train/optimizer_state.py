"""The ZeRO 1/2 optimiser state of a checkpoint re-sliced for another number of ranks, from DeepSpeed's own files.

DeepSpeed's ZeRO 1/2 optimisers keep on each rank a slice of each group's flat fp32 master weights and of its
Adam moments, and each rank writes its slice to its own file of the checkpoint (`[bf16_]zero_pp_rank_R_mp_rank_00
_optim_states.pt`: `bf16_` when the run is bf16). DeepSpeed loads those files only on the same number of ranks.
A resume on another number reads them all (read_full_state) and writes this rank's new slices (load_full_state),
so a checkpoint costs nothing more than DeepSpeed's own files, and only that rare resume pays.

The layout read back, per optimiser group (DeepSpeed 0.19.8; deepspeed/utils/zero_to_fp32.py reads the fp32
weights the same way): the group's parameters, in the order of `param_shapes` in the model file
(mp_rank_00_model_states.pt), flattened one after the other, each followed by its alignment padding (`param_alignment_paddings`; none unless parameter_alignment is
on), the whole padded to a multiple of 2 x ranks and cut into one equal partition per rank. The optimisers that
write these files:
- DeepSpeedZeroOptimizer (fp32 and bf16, ZeRO 1 and 2; bf16 with data_types.grad_accum_dtype=fp32 only under
  ZeRO 2): the fp32 partition is written without its group padding (`group_paddings`, the part of the
  partition past the group's end) and the moments with it (without it under elastic_checkpoint);
- BF16_Optimizer (bf16, ZeRO 1 with data_types.grad_accum_dtype=fp32): partitions and moments whole.
So rank after rank, each rank's fp32 partition and the same length of each moment make the group's flat state.
Each file is checked (its partition count and groups, one partition size and one finite Adam step count for all
ranks, moments as long as the partition with or without its padding, and the parameter fragments it says it
holds where its place gives them), and the flat state must hold the parameters of `param_shapes` exactly, up to
the final padding: anything else is a ConfigError naming the file.

Refused in one line: zero_optimization.round_robin_gradients on more than one rank, in the checkpoint or in this
run. DeepSpeed then stores the parameters interleaved over the ranks but links each one (its _hp_mapping, the
fragments it writes to the files, its safe_get_full_* API) as if they were not, so neither the files' fragment
lists nor the links that load_full_state writes through would be right.

ZeRO 0 keeps no slices (fp32: torch's AdamW; bf16: FP16_UnfusedOptimizer with whole fp32 masters): its whole
optimiser state is in DeepSpeed's model file, which DeepSpeed loads on any number of ranks (not tested here).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from moca_fast.errors import ConfigError
from moca_fast.io.safe_load import deepspeed_globals, safe_load

MOMENTS = ("exp_avg", "exp_avg_sq")
MODEL_FILE = "mp_rank_00_model_states.pt"


def sliced_groups(engine) -> list[list[torch.nn.Parameter]] | None:
    """The model parameters of each optimiser group where the optimiser keeps per-rank slices of their fp32
    state (ZeRO 1/2, or bf16); None where it keeps it whole."""
    for attr in ("bit16_groups", "bf16_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups is not None:
            return groups
    return None


def refuse_round_robin(engine, world_size: int, written_by: int) -> None:
    """A ConfigError where this engine's ZeRO optimiser interleaves the parameters over several ranks
    (zero_optimization.round_robin_gradients): DeepSpeed 0.19.8 then links each parameter to another place of
    its partition than the one it stores it at, so the state written through those links would be wrong."""
    if getattr(engine.optimizer, "round_robin_gradients", False) and world_size > 1:
        raise ConfigError(f"zero_optimization.round_robin_gradients=true on {world_size} ranks: DeepSpeed 0.19.8 "
                          f"links its parameters to the wrong places of its partitions then, so the optimiser state "
                          f"cannot be re-sliced into it: resume on {written_by} ranks or without round_robin_gradients")


def optimizer_files(folder: Path, ranks: int) -> list[Path]:
    """The optimiser file of each of the `ranks` ranks that wrote DeepSpeed's checkpoint folder `folder`."""
    for prefix in ("", "bf16_"):
        files = [folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(ranks)]
        if files[0].is_file():
            return files
    raise ConfigError(f"{folder / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}: missing (nor its bf16_ twin): "
                      f"the checkpoint holds no ZeRO 1/2 optimiser state to re-slice")


def read_full_state(folder: Path, ranks: int) -> dict:
    """{"params": {name: {"fp32", "exp_avg", "exp_avg_sq"}: fp32 CPU tensors of the parameter's shape},
    "steps": [Adam's step count per optimiser group]} of DeepSpeed's checkpoint folder `folder` (its model
    file and the optimiser files of its `ranks` ranks)."""
    shapes = _param_shapes(folder / MODEL_FILE)
    files = optimizer_files(folder, ranks)
    slices = [_rank_slices(path, ranks, len(shapes)) for path in files]
    for path, rank_slices in zip(files, slices):
        if rank_slices["steps"] != slices[0]["steps"] or rank_slices["size"] != slices[0]["size"]:
            raise ConfigError(f"{path}: partitions of {rank_slices['size']} values after {rank_slices['steps']} "
                              f"Adam steps, rank 0's of {slices[0]['size']} after {slices[0]['steps']}: the ranks' "
                              f"optimiser files are not from one checkpoint")
    params = {}
    for group, named_shapes in enumerate(shapes):
        flat = {key: torch.cat([rank_slices["groups"][group][key] for rank_slices in slices])
                for key in ("fp32",) + MOMENTS}
        paddings = slices[0]["groups"][group]["paddings"] or [0] * len(named_shapes)
        starts, offset = {}, 0
        for (name, shape), padding in zip(named_shapes.items(), paddings):
            numel = math.prod(shape)
            if offset + numel <= flat["fp32"].numel():
                params[name] = {key: values.narrow(0, offset, numel).view(shape) for key, values in flat.items()}
            starts[name] = (offset, numel)
            offset += numel + padding
        if len(paddings) != len(named_shapes) or not 0 <= flat["fp32"].numel() - offset < 2 * ranks:
            raise ConfigError(f"{folder}: the {ranks} ranks' optimiser files hold {flat['fp32'].numel()} values of "
                              f"group {group}, its {len(named_shapes)} parameters in {MODEL_FILE} take {offset}: "
                              f"not the files of this model")
        for rank, (path, rank_slices) in enumerate(zip(files, slices)):
            _check_slice_names(path, rank_slices["groups"][group]["names"], starts, rank, slices[0]["size"][group])
    return {"params": params, "steps": slices[0]["steps"]}


def _check_slice_names(path: Path, names: dict | None, starts: dict[str, tuple[int, int]], rank: int,
                       size: int) -> None:
    """The parameter fragments a rank's file says it holds (start in its partition, length) must be those its
    place in the flat group gives: a file of another rank (or run) in its place fails here."""
    begin, end = rank * size, (rank + 1) * size
    expected = {name: (max(start, begin) - begin, min(start + numel, end) - max(start, begin))
                for name, (start, numel) in starts.items() if start < end and start + numel > begin}
    if names is not None and names != expected:
        raise ConfigError(f"{path}: holds {len(names)} parameter slices ({', '.join(list(names)[:2])}, ...) where "
                          f"rank {rank}'s partition holds {len(expected)} ({', '.join(list(expected)[:2])}, ...): "
                          f"not the file of rank {rank} of this checkpoint")


def _param_shapes(path: Path) -> list[dict[str, tuple[int, ...]]]:
    """The trained parameters' names and shapes per optimiser group, in the flat groups' order."""
    state = safe_load(path, map_location="cpu", allowed=deepspeed_globals(), mmap=True)
    try:
        return [{str(name): tuple(int(n) for n in shape) for name, shape in group.items()}
                for group in state["param_shapes"]]
    except (KeyError, AttributeError, TypeError, ValueError):
        raise ConfigError(f"{path}: holds no parameter shapes per optimiser group (param_shapes): not a DeepSpeed "
                          f"ZeRO 1/2 model file") from None


def _rank_slices(path: Path, ranks: int, groups: int) -> dict:
    """{"groups": [{"fp32", "exp_avg", "exp_avg_sq": this rank's part of the group's flat state, "paddings": each
    parameter's alignment padding}], "steps": [Adam's step count per group], "size": [partition size per group]}
    of one rank's optimiser file."""
    state = safe_load(path, map_location="cpu", allowed=deepspeed_globals(), mmap=True)
    zero = state.get("ds_config", {}).get("zero_optimization", {}) if isinstance(state, dict) else {}
    if isinstance(zero, dict) and zero.get("round_robin_gradients") and ranks > 1:
        raise ConfigError(f"{path}: written with zero_optimization.round_robin_gradients=true on {ranks} ranks, whose "
                          f"parameter order DeepSpeed 0.19.8 does not record consistently: resume it on {ranks} ranks")
    try:
        return _slices(state["optimizer_state_dict"], ranks, groups)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not the ZeRO 1/2 optimiser file of one of {ranks} ranks with {groups} optimiser "
                          f"groups ({str(e) or type(e).__name__})") from None


def _slices(saved: dict, ranks: int, groups: int) -> dict:
    counts = saved["partition_count"]
    if any(int(count) != ranks for count in (counts if isinstance(counts, list) else [counts])):
        raise ValueError(f"written by {counts} ranks")
    partitions, adam = saved["single_partition_of_fp32_groups"], saved["base_optimizer_state"]
    if not isinstance(adam, list):  # torch's state_dict: one flat parameter per group, numbered in order
        adam = [adam["state"][group] for group in range(groups)]
    alignments = saved.get("param_alignment_paddings") or [[]] * groups
    if not len(partitions) == len(adam) == len(alignments) == groups:
        raise ValueError(f"{len(partitions)} groups")
    mappings = saved.get("param_slice_mappings") or [None] * groups
    without_padding = "zero_stage" in saved  # DeepSpeedZeroOptimizer's fp32 partitions; BF16_Optimizer's are whole
    out = {"groups": [], "steps": [], "size": []}
    for fp32, moments, padding, alignment, mapping in zip(partitions, adam, saved["group_paddings"], alignments,
                                                          mappings):
        if fp32.dim() != 1 or fp32.dtype != torch.float32:
            raise ValueError(f"an fp32 partition of shape {tuple(fp32.shape)}, {fp32.dtype}")
        size = fp32.numel() + int(padding) if without_padding else fp32.numel()
        group = {"fp32": fp32, "paddings": [int(n) for n in alignment], "names": None}
        for key in MOMENTS:
            if moments[key].dim() != 1 or moments[key].numel() not in (fp32.numel(), size):
                raise ValueError(f"{key} of shape {tuple(moments[key].shape)} for a partition of {size}")
            group[key] = moments[key][:fp32.numel()].float()
        if mapping is not None:
            group["names"] = {str(name): (int(where.start), int(where.numel)) for name, where in mapping.items()}
        out["groups"].append(group)
        step = float(moments["step"])
        if not math.isfinite(step) or step < 0:
            raise ValueError(f"Adam step count {step}")
        out["steps"].append(step)
        out["size"].append(size)
    return out


def load_full_state(engine, state: dict, source: Path) -> None:
    """Writes this rank's slices of the fp32 master weights and Adam moments (and the step counts) from a
    read_full_state dict into a freshly built engine, then the model weights from the masters."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    groups = sliced_groups(engine)
    inner = engine.optimizer.optimizer
    names = {id(param): name for name, param in engine.module.named_parameters()}
    saved = state["params"]
    wrong = [names[id(p)] for group in groups for p in group
             if names[id(p)] not in saved or saved[names[id(p)]]["fp32"].numel() != p.numel()]
    if wrong or len(state["steps"]) != len(inner.param_groups):
        raise ConfigError(f"{source} does not match this model's optimiser (missing or of another size: "
                          f"{', '.join(wrong[:3]) or 'none'}; {len(state['steps'])} groups, the optimiser has "
                          f"{len(inner.param_groups)})")
    for group, params, step in zip(inner.param_groups, groups, state["steps"]):
        flat = group["params"][0]
        for param in params:
            mapping = param._hp_mapping
            if mapping is None:  # no part of this parameter in this rank's slice
                continue
            full = saved[names[id(param)]]
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

            def piece(values: torch.Tensor) -> torch.Tensor:
                return values.flatten().narrow(0, start, numel).to(flat.device, flat.dtype)

            mapping.hp_fragment.data.copy_(piece(full["fp32"]))
            mapping.optim_fragment = {key: piece(full[key]).clone() for key in MOMENTS}
        map_to_flat_opt_states(flat, params, inner.state, MOMENTS)
        on_device = group.get("fused") or group.get("capturable")  # torch AdamW keeps the step there
        inner.state[flat]["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu")
    engine.optimizer.update_lp_params()
