"""Process group start-up, the DeepSpeed config generated from ours, and the DeepSpeed engine.

DeepSpeed config precedence (documented for users of --deepspeed_config):
1. Our Config (preset < YAML < key=value) defines the training semantics; from it we generate
   train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size,
   gradient_clipping, zero_optimization.stage and bf16.enabled.
2. A user JSON file is deep-merged over the generated config and wins for every other key
   (e.g. zero_optimization.reduce_bucket_size, comms_logger, flops_profiler).
3. A user value for one of the generated keys must equal ours, else a ConfigError names the
   Config field to set instead; "optimizer", "scheduler" and fp16 are rejected (the optimiser
   groups and schedules are MOCA's, the precision is bf16 or fp32).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from moca_fast.config import Config, ConfigError
from moca_fast.model.fastpath import prepare_fast, trainer_fast_options
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
REJECTED_KEYS = {
    "optimizer": "the optimiser is AdamW over MOCA's parameter groups (set blr/lr/weight_decay/adam_betas)",
    "scheduler": "the lr/wd/momentum schedules are MOCA's (set warmup_epochs/lr_epochs_mul/weight_decay_end)",
    "fp16.enabled": "fp16 is not supported (use precision=bf16 or fp32)",
    "checkpoint.use_node_local_storage": "checkpoints go to one shared --output folder (global rank 0 writes the "
                                         "model, each rank its own partition and trainer file)",
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Starts the process group through DeepSpeed (NCCL on GPUs, gloo on CPU).

    Under a launcher (deepspeed, torchrun) the RANK/WORLD_SIZE/MASTER_* variables exist; a plain
    `python launch/train.py` gets a one-process group on a free local port.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
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
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": effective_batch_size(cfg, world_size),
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage > 0:
        ds["zero_optimization"].update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    return ds


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def merge_user_config(generated: dict, user: dict, source: str = "--deepspeed_config") -> dict:
    """The generated config with the user's deep-merged over it (see the module docstring)."""
    for dotted, why in REJECTED_KEYS.items():
        value = _get(user, dotted)
        if value is not None and value is not False:
            raise ConfigError(f"{source}: {dotted!r} is not accepted: {why}")
    for dotted, field in GENERATED_KEYS.items():
        value = _get(user, dotted)
        if value is not None and value != _get(generated, dotted):
            raise ConfigError(f"{source}: {dotted}={value!r} conflicts with the value {_get(generated, dotted)!r} "
                              f"from our config; set {field} instead")
    return _deep_merge(generated, user)


def load_user_deepspeed_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return user


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
                 user_config: dict | None = None):
    """deepspeed.initialize over the student's parameters (the four MOCA groups, torch AdamW), after the
    fast-path preparation that cfg.impl / cfg.compile_blocks ask for (moca_fast.model.fastpath).

    Returns (engine, ds_config). After it the teacher and the codebook are fp32 on the device
    (restored from fp32 copies: DeepSpeed casts every parameter in bf16 mode).
    """
    import deepspeed

    ds_config = generate_deepspeed_config(cfg, dist_info.world_size, precision)
    if user_config:
        ds_config = merge_user_config(ds_config, user_config)
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
    _restore_fp32(engine.module, snapshot)
    _match_batchnorm_statistics(engine.module)
    return engine, ds_config


def input_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32
