"""Process group start-up, the DeepSpeed config generated from ours, and the DeepSpeed engine.

DeepSpeed config precedence (documented for users of --deepspeed_config):
1. Our Config (preset < YAML < key=value) defines the training semantics; from it we generate
   train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size,
   gradient_clipping, zero_optimization.stage and bf16.enabled. For speed we also turn off
   DeepSpeed's throughput timer and overlap_comm (host syncs, see moca_fast.train.host_syncs).
2. A user JSON file is deep-merged over the generated config and wins for every other key
   (e.g. zero_optimization.reduce_bucket_size, comms_logger, flops_profiler).
3. A user value for one of the generated keys must equal ours (JSON type included), else a ConfigError
   names the Config field to set instead; "optimizer", "scheduler", fp16 / amp / torch_autocast and the
   old "bfloat16" are rejected (the optimiser groups and schedules are MOCA's, the precision is bf16 or
   fp32). The sections holding those keys must be objects, the step-time scalars of USER_SCALARS have their
   type and range, and the merged config must pass DeepSpeed's own parser. All of it runs before the run
   starts (deepspeed_config), each refusal one line naming the file and the key.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from moca_fast.config import Config
from moca_fast.distributed import free_port
from moca_fast.errors import ConfigError
from moca_fast.model.fastpath import prepare_fast, trainer_fast_options
from moca_fast.train.host_syncs import reduce_host_syncs
from moca_fast.train.schedules import effective_batch_size, parameter_groups

log = logging.getLogger("moca_fast.train")

#: submodules of MOCA that are not optimiser state and must stay fp32 whatever DeepSpeed casts
FP32_SUBMODULES = ("teacher", "codebook")

#: generated DeepSpeed keys (dotted paths) -> the Config field that sets them
GENERATED_KEYS = {
    "train_micro_batch_size_per_gpu": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "train_batch_size": "batch_size and grad_accum",
    "gradient_clipping": "clip_grad",
    "zero_optimization.stage": "zero_stage",
    "bf16.enabled": "precision",
}
#: refused keys: present at all (top level), enabled (".enabled": anything but absent / false / an object
#: without it), or set to anything but false (other dotted keys)
REJECTED_KEYS = {
    "optimizer": "the optimiser is AdamW over MOCA's parameter groups (set blr/lr/weight_decay/adam_betas)",
    "scheduler": "the lr/wd/momentum schedules are MOCA's (set warmup_epochs/lr_epochs_mul/weight_decay_end)",
    "fp16.enabled": "fp16 is not supported (use precision=bf16 or fp32)",
    "amp.enabled": "apex AMP is not supported (use precision=bf16 or fp32)",
    "bfloat16": "DeepSpeed's old name of bf16, which our config generates (set precision)",
    "torch_autocast.enabled": "the precision is ours (set precision)",
    "checkpoint.use_node_local_storage": "checkpoints go to one shared --output folder (global rank 0 writes the "
                                         "model, each rank its own partition and trainer file)",
}


#: top-level keys DeepSpeed reads without checking them and uses at every step: (type, test, what it must be)
USER_SCALARS = {
    "steps_per_print": (int, lambda v: v >= 1, "an integer >= 1 (DeepSpeed divides the step by it)"),
    "gradient_predivide_factor": (float | int, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    **{key: (bool, lambda v: True, "true or false") for key in (
        "wall_clock_breakdown", "memory_breakdown", "prescale_gradients", "sparse_gradients", "dump_state",
        "disable_allgather", "dataloader_drop_last", "zero_allow_untested_optimizer")},
}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Starts the process group through DeepSpeed (NCCL on GPUs, gloo on CPU).

    Under a launcher (deepspeed, torchrun) the RANK/WORLD_SIZE/MASTER_* variables exist; a plain
    `python launch/train.py` gets a one-process group on a free local port.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # DeepSpeed JIT-compiles a shared-memory C++ op (~30 s, first run) that only its inference
        # all-reduce uses; training never calls it, so it is marked unavailable instead of built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e):
                raise
            raise ConfigError(f"the master port {os.environ['MASTER_PORT']} of {os.environ['MASTER_ADDR']} is in use "
                              f"(another run or program); choose a free one with {_master_port_setting()}") from None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _master_port_setting() -> str:
    """How the user sets the master port under the launcher that started this process."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read()
    except OSError:
        parent = b""
    if b"deepspeed.launcher.launch" in parent:
        return "`deepspeed --master_port PORT ...`"
    if b"torch.distributed.run" in parent or b"torchrun" in parent:
        return "`torchrun --master-port PORT ...`"
    return "MASTER_PORT=PORT in the environment"


def barrier() -> None:
    """dist.barrier() when there is more than one rank."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """"bf16" or "fp32": precision=auto is bf16 on a CUDA device, fp32 elsewhere."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def generate_deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    """The DeepSpeed config of a run."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": effective_batch_size(cfg, world_size),
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},  # 2 device syncs per micro-step (moca_fast.train.host_syncs)
    }
    if cfg.zero_stage > 0:  # overlap_comm: a device sync per reduction, nothing to overlap (host_syncs)
        ds["zero_optimization"].update(contiguous_gradients=True, overlap_comm=False)
    return ds


_ABSENT = object()


def _get(tree: dict, dotted: str, default=None):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return default
        tree = tree[key]
    return tree


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _json(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)


def _same_value(value, ours) -> bool:
    """value equals ours with ours' JSON type: no true for 1, no 2.0 or "2" for 2 (DeepSpeed would take them)."""
    if isinstance(ours, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(ours, bool) and value == ours
    if isinstance(ours, int):
        return isinstance(value, int) and value == ours
    return isinstance(value, (int, float)) and value == ours


def _check_sections(user: dict, source: str) -> None:
    """Every section holding a key we generate or read is a JSON object (DeepSpeed unpacks it with **)."""
    for dotted in list(GENERATED_KEYS) + [key for key in REJECTED_KEYS if "." in key]:
        parts = dotted.split(".")
        for depth in range(1, len(parts)):
            section = ".".join(parts[:depth])
            value = _get(user, section, _ABSENT)
            if value is not _ABSENT and not isinstance(value, dict):
                raise ConfigError(f"{source}: {section}={_json(value)} must be a JSON object "
                                  f'(e.g. {{"{parts[depth]}": ...}})')


def _is_enabled(section) -> bool:
    """A DeepSpeed feature section that turns something on: anything but absent, false, or an object whose
    "enabled" is absent or false."""
    if section is _ABSENT or section is False:
        return False
    return not (isinstance(section, dict) and section.get("enabled", False) is False)


def merge_user_config(generated: dict, user: dict, source: str = "--deepspeed_config") -> dict:
    """The generated config with the user's deep-merged over it (see the module docstring); every key we
    generate or rely on is checked first: one ConfigError line naming `source` and the key."""
    for dotted, why in REJECTED_KEYS.items():
        section, _, flag = dotted.rpartition(".")
        value = _get(user, section or dotted, _ABSENT)
        refused = _is_enabled(value) if flag == "enabled" else (
            value is not _ABSENT if not section else _get(user, dotted, False) is not False)
        if refused:
            raise ConfigError(f"{source}: {dotted!r} is not accepted: {why}")
    _check_sections(user, source)
    for dotted, field in GENERATED_KEYS.items():
        value = _get(user, dotted, _ABSENT)
        if value is not _ABSENT and not _same_value(value, _get(generated, dotted)):
            raise ConfigError(f"{source}: {dotted}={_json(value)} conflicts with the value "
                              f"{_json(_get(generated, dotted))} from our config; set {field} instead")
    for key, (kind, check, expected) in USER_SCALARS.items():
        value = user.get(key, _ABSENT)
        if value is not _ABSENT and not (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
                                         and check(value)):
            raise ConfigError(f"{source}: {key}={_json(value)} must be {expected}")
    merged = _deep_merge(generated, user)
    _check_with_deepspeed(merged, generated, user, source)
    return merged


def _deepspeed_refuses(config: dict) -> Exception | None:
    """The error DeepSpeed's own config parser raises on `config` (its batch keys but train_batch_size, which
    needs the world size and was checked above), or None. Its log lines are silenced meanwhile."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as deepspeed_log

    level = deepspeed_log.level
    deepspeed_log.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig({k: v for k, v in config.items() if k != "train_batch_size"})
    except Exception as e:  # noqa: BLE001 - any refusal of DeepSpeed's parser becomes one line below
        return e
    finally:
        deepspeed_log.setLevel(level)
    return None


def _check_with_deepspeed(merged: dict, generated: dict, user: dict, source: str) -> None:
    """DeepSpeed's parser on the merged config, before anything starts. A refusal names the user's top-level
    key without which the config parses (and the field inside it, where DeepSpeed's validation says)."""
    error = _deepspeed_refuses(merged)
    if error is None:
        return
    culprit = next((key for key in user if _deepspeed_refuses(
        {k: v for k, v in merged.items() if k != key} | ({key: generated[key]} if key in generated else {})) is None),
        None)
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    errors = error.errors() if hasattr(error, "errors") and callable(error.errors) else None
    if errors:  # pydantic: the field path inside the section, and the reason
        loc = [str(part) for part in errors[0].get("loc", ())]
        if culprit is not None and loc[:1] != [culprit]:
            loc = [culprit] + loc
        culprit, detail = ".".join(loc) or culprit, f"{errors[0].get('msg', detail)} (got {_json(errors[0].get('input'))})"
    raise ConfigError(f"{source}: {culprit if culprit is not None else 'the merged config'}: DeepSpeed refuses it: "
                      f"{detail}")


def load_user_deepspeed_config(path: str | os.PathLike) -> dict:
    """The JSON object of a --deepspeed_config file (a key given twice is refused, as DeepSpeed does)."""
    from moca_fast.config_file import read_text_file

    path = Path(path)
    text = read_text_file(path, "DeepSpeed config")

    def no_duplicates(pairs):
        keys = [key for key, _ in pairs]
        twice = next((key for key in keys if keys.count(key) > 1), None)
        if twice is not None:
            raise ConfigError(f"DeepSpeed config {path}: {twice!r} is given twice in one object")
        return dict(pairs)

    try:
        user = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return user


def deepspeed_config(cfg: Config, world_size: int, precision: str, user_path: str | os.PathLike | None) -> dict:
    """The DeepSpeed config of a run: generated from cfg, with a user file merged over it and checked."""
    generated = generate_deepspeed_config(cfg, world_size, precision)
    if user_path is None:
        return generated
    return merge_user_config(generated, load_user_deepspeed_config(user_path), f"DeepSpeed config {user_path}")


def _fp32_tensors(model: nn.Module):
    """(name, tensor) of the floating-point parameters and buffers of FP32_SUBMODULES."""
    for prefix in FP32_SUBMODULES:
        module = getattr(model, prefix)
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point():
                yield f"{prefix}.{name}", tensor


def _restore_fp32(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Puts back the fp32 values taken before deepspeed.initialize (its bf16 mode casts parameters)."""
    for name, tensor in _fp32_tensors(model):
        tensor.data = snapshot[name].to(tensor.device)


def _match_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm needs its running statistics in its parameters' dtype (bf16 after DeepSpeed's cast)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            for name in ("running_mean", "running_var"):
                buffer = getattr(m, name)
                if buffer is not None:
                    buffer.data = buffer.data.to(m.weight.dtype)


def build_engine(model: nn.Module, cfg: Config, dist_info: DistInfo, precision: str,
                 ds_config: dict | None = None):
    """deepspeed.initialize over the student's parameters (the four MOCA groups, torch AdamW), after the
    fast-path preparation that cfg.impl / cfg.compile_blocks ask for (moca_fast.model.fastpath).

    ds_config: the run's DeepSpeed config (deepspeed_config); None: the one generated from cfg.
    Returns (engine, ds_config). After it the teacher and the codebook are fp32 on the device
    (restored from fp32 copies: DeepSpeed casts every parameter in bf16 mode).
    """
    import deepspeed

    if ds_config is None:
        ds_config = generate_deepspeed_config(cfg, dist_info.world_size, precision)
    options = trainer_fast_options(cfg, dist_info.device)
    if options is not None:
        prepare_fast(model, options)
        log.info("fast path: patch embedding as a GEMM %s, compiled blocks %s (activation memory budget %g)",
                 "on" if options.matmul_patch_embed else "off", "on" if options.compile_blocks else "off",
                 options.activation_memory_budget)
    model = model.to(dist_info.device)
    groups = parameter_groups(model, model.GENERATOR_PREFIXES)
    # torch AdamW: DeepSpeed's own Adam would JIT-build a C++ op on CPU; fused on CUDA.
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.adam_betas),
                                  fused=dist_info.device.type == "cuda")
    snapshot = {name: t.detach().clone() for name, t in _fp32_tensors(model)}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    reduce_host_syncs(engine)
    _restore_fp32(engine.module, snapshot)
    _match_batchnorm_statistics(engine.module)
    return engine, ds_config


def input_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32
