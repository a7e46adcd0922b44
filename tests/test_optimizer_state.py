"""The ZeRO 1/2 optimiser state of a checkpoint written on one number of gloo ranks, re-sliced on another from
DeepSpeed's per-rank files (moca_fast.train.optimizer_state), is exact; damaged or missing files are refused.

Runs of the tiny model with real DeepSpeed engines (CPU) on 1 and on 2 ranks take two steps on the same batches
and masks on every rank, write a checkpoint (moca_fast.train.checkpoint.save_checkpoint) and take a third step.
The reference is DeepSpeed's own gather of each parameter's whole fp32 master and Adam moments
(safe_get_full_*): the state rebuilt from the checkpoint's files must equal it, bit for bit. A fresh engine on
the other number of ranks, built from other weights, resumes from the checkpoint (load_checkpoint): gathered,
its state must be the saved one, bit for bit, and after the same third step its fp32 master weights, Adam
moments and step counts must equal the original run's, bit for bit. Every rank sees the same batch, so the
2-rank average of the gradients is exact, and clip_grad=0, so no norm summed in another order enters the step:
a moment misplaced, lost or zeroed shows. The optimisers and file names covered: DeepSpeedZeroOptimizer fp32
(zero_pp_rank_*) under ZeRO 1 and 2, bf16 (bf16_zero_pp_rank_*) under ZeRO 2, BF16_Optimizer (bf16, ZeRO 1,
data_types.grad_accum_dtype=fp32; its partitions are written with their padding), and ZeRO 2 with
elastic_checkpoint (the moments written without padding) and parameter_alignment (padding after each parameter
whose size is not a multiple of 4 values: the tiny model has none, so only the bookkeeping of that path runs).
round_robin_gradients is refused (see moca_fast.train.optimizer_state).
"""
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moca_fast.config import load_config
from moca_fast.distributed import free_port
from moca_fast.errors import ConfigError
from moca_fast.io.safe_load import deepspeed_globals
from moca_fast.train.optimizer_state import MODEL_FILE, read_full_state, refuse_round_robin

LR = 1e-3
#: (zero_stage, precision, sections added to the generated DeepSpeed config)
OPTIMIZERS = {"fp32-zero1": (1, "fp32", {}), "fp32-zero2": (2, "fp32", {}), "bf16-zero2": (2, "bf16", {}),
              "bf16-zero1-fp32-accumulation": (1, "bf16", {"data_types": {"grad_accum_dtype": "fp32"}}),
              "fp32-zero2-aligned-elastic": (2, "fp32", {"zero_optimization": dict(
                  parameter_alignment=True, elastic_checkpoint=True)})}


def _step(engine, seed: int, dtype: torch.dtype) -> None:
    """One optimiser step on a batch and masks that are a function of `seed` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
    torch.manual_seed(seed)
    random.seed(seed)
    masks = engine.module.sample_masks(8, "cpu")
    for group in engine.optimizer.param_groups:
        group["lr"] = LR
        group["weight_decay"] = 0.0 if "no_decay" in group["name"] else 0.05
    loss, _ = engine(x1.to(dtype), x2.to(dtype), momentum=0.99, masks=masks, update_teacher=True)
    engine.backward(loss)
    engine.step()


def _gathered(engine) -> dict | None:
    """Collective. On rank 0, every trained parameter's whole fp32 master and Adam moments gathered by DeepSpeed
    (the reference), and Adam's step count per group; None on the other ranks."""
    from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param,
                                 safe_get_full_optimizer_state)
    from moca_fast.train.optimizer_state import MOMENTS, sliced_groups

    inner = engine.optimizer.optimizer
    # DeepSpeed 0.19.8 links each parameter to its moments once, after the first group's first step, when the
    # other groups have none yet (safe_get_full_optimizer_state then fails for them): linked again here
    for group, params in zip(inner.param_groups, sliced_groups(engine)):
        lazy_init_hp_params_optimizer_state(params, group["params"][0], inner.state)
    params = {}
    for name, param in engine.module.named_parameters():
        if hasattr(param, "_hp_mapping"):  # trained (None: no part of it on this rank; still a collective)
            full = {"fp32": safe_get_full_fp32_param(param)}
            full.update((key, safe_get_full_optimizer_state(param, key)) for key in MOMENTS)
            params[name] = {key: value.detach().to("cpu", torch.float32, copy=True) for key, value in full.items()}
    steps = [float(inner.state[group["params"][0]]["step"]) for group in inner.param_groups]
    return {"params": params, "steps": steps} if dist.get_rank() == 0 else None


def _rank(rank: int, world: int, port: int, variant: str, load_from: str | None, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moca_fast.model.moca import MOCA
    from moca_fast.train.checkpoint import load_checkpoint, save_checkpoint
    from moca_fast.train.engine import build_engine, generate_deepspeed_config, init_distributed, input_dtype

    dist_info = init_distributed()
    zero_stage, precision, sections = OPTIMIZERS[variant]
    cfg = load_config("tiny", overrides=dict(zero_stage=zero_stage, clip_grad=0.0, precision=precision))
    ds_config = generate_deepspeed_config(cfg, world, precision)
    for key, section in sections.items():
        ds_config[key] = {**ds_config.get(key, {}), **section}
    torch.manual_seed(1 if load_from else 0)  # the loading engine starts from other weights
    engine, _ = build_engine(MOCA(cfg, world), cfg, dist_info, precision, ds_config)
    dtype = input_dtype(precision)
    if load_from is None:
        _step(engine, 11, dtype)
        _step(engine, 12, dtype)
        save_checkpoint(engine, out, 2, {}, {"world_size": world, "config": cfg.to_dict()}, keep=1)
        name = "saved.pt"
    else:
        load_checkpoint(engine, Path(load_from), world)
        name = "loaded.pt"
    state = _gathered(engine)
    if rank == 0:
        torch.save(state, f"{out}/{name}")
    _step(engine, 13, dtype)
    state = _gathered(engine)
    if rank == 0:
        torch.save(state, f"{out}/after.pt")
        torch.save(type(engine.optimizer).__name__, f"{out}/optimizer.pt")
    dist.barrier()  # no rank exits while gloo's threads of another still run (an abort at exit, seen once)
    dist.destroy_process_group()


def _run(world: int, variant: str, out, load_from=None) -> None:
    out.mkdir()
    mp.spawn(_rank, args=(world, free_port(), variant, load_from and str(load_from), str(out)), nprocs=world,
             join=True)


def _checkpoint(run) -> "os.PathLike":
    return run / "checkpoints" / "step_00000002"


def _assert_equal(a: dict, b: dict) -> int:
    assert a["steps"] == b["steps"] and a["params"].keys() == b["params"].keys()
    for name, tensors in a["params"].items():
        for key, value in tensors.items():
            assert torch.equal(value, b["params"][name][key]), (name, key)
    return sum(len(tensors) for tensors in a["params"].values())


@pytest.mark.parametrize("variant", list(OPTIMIZERS))
def test_the_optimizer_state_re_sliced_on_another_number_of_ranks_steps_exactly_as_before(tmp_path, variant):
    for world in (1, 2):
        _run(world, variant, tmp_path / f"on{world}")
        saved = torch.load(tmp_path / f"on{world}" / "saved.pt", weights_only=True)
        rebuilt = read_full_state(_checkpoint(tmp_path / f"on{world}") / "deepspeed", world)
        assert _assert_equal(rebuilt, saved) > 30, "the state rebuilt from the files is DeepSpeed's own, bit for bit"
    optimizer = torch.load(tmp_path / "on2" / "optimizer.pt", weights_only=True)
    assert optimizer == ("BF16_Optimizer" if variant == "bf16-zero1-fp32-accumulation" else "DeepSpeedZeroOptimizer")
    prefix = "bf16_" if OPTIMIZERS[variant][1] == "bf16" else ""
    assert (_checkpoint(tmp_path / "on2") / "deepspeed" / f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    for before, after in ((2, 1), (1, 2)):
        out = tmp_path / f"from{before}to{after}"
        _run(after, variant, out, load_from=_checkpoint(tmp_path / f"on{before}"))
        saved = torch.load(tmp_path / f"on{before}" / "saved.pt", weights_only=True)
        assert saved["steps"] == [2.0] * len(saved["steps"]) and len(saved["steps"]) >= 2
        assert _assert_equal(torch.load(out / "loaded.pt", weights_only=True), saved) > 30
        original = torch.load(tmp_path / f"on{before}" / "after.pt", weights_only=True)
        assert _assert_equal(torch.load(out / "after.pt", weights_only=True), original) > 30
        moved = [(original["params"][n]["fp32"] - saved["params"][n]["fp32"]).abs().max() for n in saved["params"]]
        assert max(moved) > LR / 2, "the third step moved the weights"


@pytest.fixture(scope="module")
def two_rank_files(tmp_path_factory):
    """DeepSpeed's files of a checkpoint written by 2 ranks (fp32, ZeRO 2)."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    _run(2, "fp32-zero2", run)
    return _checkpoint(run) / "deepspeed"


@pytest.fixture
def files(two_rank_files, tmp_path):
    copy = tmp_path / "deepspeed"
    shutil.copytree(two_rank_files, copy)
    return copy


def _rank_file(folder, rank: int):
    return folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _rewrite(path, change) -> None:
    with torch.serialization.safe_globals(deepspeed_globals()):
        state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _refused(folder, ranks=2) -> str:
    with pytest.raises(ConfigError) as refusal:
        read_full_state(folder, ranks)
    message = str(refusal.value)
    assert "\n" not in message
    return message


def test_a_missing_or_unreadable_rank_file_is_refused_in_one_line_naming_it(files):
    assert read_full_state(files, 2)["steps"] == [2.0] * 4
    (files / MODEL_FILE).rename(files / "moved")
    assert _refused(files) == f"{files / MODEL_FILE}: missing"
    (files / "moved").rename(files / MODEL_FILE)
    rank1 = _rank_file(files, 1)
    data = rank1.read_bytes()
    rank1.unlink()
    assert _refused(files) == f"{rank1}: missing"
    rank1.write_bytes(data[: len(data) // 2])
    assert _refused(files).startswith(f"{rank1}: unreadable (")
    rank1.write_bytes(os.urandom(4096))
    assert _refused(files).startswith(f"{rank1}: unreadable (")
    _rank_file(files, 0).unlink()
    assert _refused(files) == (f"{_rank_file(files, 0)}: missing (nor its bf16_ twin): the checkpoint holds no "
                               f"ZeRO 1/2 optimiser state to re-slice")


def test_rank_files_whose_shapes_do_not_add_up_to_the_model_are_refused_in_one_line(files):
    rank0, rank1 = _rank_file(files, 0), _rank_file(files, 1)
    shutil.copy(rank0, files / "rank0.pt")

    def shorter(state):  # rank 1's partition of group 0 loses a value
        saved = state["optimizer_state_dict"]
        saved["single_partition_of_fp32_groups"][0] = saved["single_partition_of_fp32_groups"][0][:-1].clone()
        moments = saved["base_optimizer_state"]["state"][0]
        moments.update((key, moments[key][:-1].clone()) for key in ("exp_avg", "exp_avg_sq"))

    _rewrite(rank1, shorter)
    message = _refused(files)
    assert message.startswith(f"{rank1}: partitions of [") and "not from one checkpoint" in message

    shutil.copy(files / "rank0.pt", rank1)  # rank 0's file in rank 1's place: the same sizes and steps
    assert _refused(files).startswith(f"{rank1}: holds ") and "not the file of rank 1 of this checkpoint" in \
        _refused(files)

    shutil.copy(files / "rank0.pt", rank0)
    _rewrite(rank0, lambda state: state["optimizer_state_dict"].update(partition_count=4))
    assert _refused(files).startswith(f"{rank0}: not the ZeRO 1/2 optimiser file of one of 2 ranks with 4 optimiser "
                                      f"groups (written by 4 ranks)")
    _rewrite(rank0, lambda state: state["optimizer_state_dict"].pop("base_optimizer_state"))
    assert _refused(files).startswith(f"{rank0}: not the ZeRO 1/2 optimiser file of one of 2 ranks")
    shutil.copy(files / "rank0.pt", rank0)

    def other_model(state):  # a parameter of another shape
        shapes = state["param_shapes"][0]
        name = next(iter(shapes))
        shapes[name] = torch.Size([shapes[name].numel() + 1])

    _rewrite(files / MODEL_FILE, other_model)
    message = _refused(files)
    assert message.startswith(f"{files}: the 2 ranks' optimiser files hold ") and "not the files of this model" in message
    _rewrite(files / MODEL_FILE, lambda state: state.pop("param_shapes"))
    assert _refused(files).startswith(f"{files / MODEL_FILE}: holds no parameter shapes")


def test_round_robin_gradients_on_several_ranks_is_refused_in_one_line_naming_the_setting(files):
    rank0 = _rank_file(files, 0)
    _rewrite(rank0, lambda state: state["ds_config"]["zero_optimization"].update(round_robin_gradients=True))
    assert _refused(files) == (f"{rank0}: written with zero_optimization.round_robin_gradients=true on 2 ranks, whose "
                               f"parameter order DeepSpeed 0.19.8 does not record consistently: resume it on 2 ranks")
    engine = SimpleNamespace(optimizer=SimpleNamespace(round_robin_gradients=True))
    refuse_round_robin(engine, 1, 2)  # one rank: nothing interleaved
    with pytest.raises(ConfigError, match=r"^zero_optimization.round_robin_gradients=true on 2 ranks: .* resume on 1 "
                                          r"ranks or without round_robin_gradients$"):
        refuse_round_robin(engine, 2, 1)
