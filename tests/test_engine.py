"""DeepSpeed config generation and user-config precedence; the real engine in bf16 (CPU, ZeRO 0, 1 and 2):
the student (generators included) is bf16 with fp32 masters, teacher and codebook stay fp32, the optimiser
updates the student only, the teacher EMA and the codebook update run once per optimiser step under
gradient accumulation; ZeRO 0 also resumes from a checkpoint bit-exactly."""
import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moca_fast.config import load_config
from moca_fast.errors import ConfigError
from moca_fast.train.engine import generate_deepspeed_config, load_user_deepspeed_config, merge_user_config
from moca_fast.distributed import free_port

EMA_RTOL = 1e-6  # fp32 EMA recomputed from the same fp32 operands


def _generated(**overrides):
    cfg = load_config("vit_base_dec2", overrides=overrides)
    return generate_deepspeed_config(cfg, world_size=8, precision="bf16")


def test_generated_config_carries_our_semantics():
    ds = _generated(batch_size=128, grad_accum=2, zero_stage=1, clip_grad=0.1)
    assert ds["train_micro_batch_size_per_gpu"] == 128 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 128 * 2 * 8
    assert ds["gradient_clipping"] == 0.1 and ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds


def test_user_config_wins_for_other_keys_and_must_agree_on_ours():
    ds = _generated()
    merged = merge_user_config(ds, {"zero_optimization": {"reduce_bucket_size": 12345, "stage": 2},
                                    "comms_logger": {"enabled": True}})
    assert merged["zero_optimization"] == {**ds["zero_optimization"], "reduce_bucket_size": 12345}
    assert merged["comms_logger"] == {"enabled": True} and merged["bf16"] == ds["bf16"]
    with pytest.raises(ConfigError, match="set zero_stage instead"):
        merge_user_config(ds, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="set batch_size instead"):
        merge_user_config(ds, {"train_micro_batch_size_per_gpu": 7})
    with pytest.raises(ConfigError, match="'optimizer' is not accepted"):
        merge_user_config(ds, {"optimizer": {"type": "Adam"}})
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        merge_user_config(ds, {"fp16": {"enabled": True}})
    assert merge_user_config(ds, {"fp16": {"enabled": False}})["bf16"]["enabled"]


def test_user_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_user_deepspeed_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_user_deepspeed_config(bad)
    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"reduce_bucket_size": 5e8}}')
    assert load_user_deepspeed_config(good)["zero_optimization"]["reduce_bucket_size"] == 5e8


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(None, path)
    for world_size in (1, 2):
        cfg.validate(world_size)
    assert generate_deepspeed_config(cfg, 2, "bf16")["train_batch_size"] == cfg.batch_size * cfg.grad_accum * 2



def _engine_facts(rank, port, zero_stage, results):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from moca_fast.model.moca import MOCA
    from moca_fast.train.engine import build_engine, init_distributed
    from moca_fast.train.step import LossTotals, train_step

    dist_info = init_distributed()
    cfg = load_config("tiny", overrides=dict(grad_accum=2, zero_stage=zero_stage))
    torch.manual_seed(0)
    reference = MOCA(cfg, 1)
    torch.manual_seed(0)
    engine, _ = build_engine(MOCA(cfg, 1), cfg, dist_info, "bf16")
    model = engine.module
    batchnorm = model.img_generator.mlp[1]
    facts = {
        "student_bf16": all(p.dtype == torch.bfloat16 for part in (model.encoder, model.decoder, model.img_generator,
                                                                   model.dense_generator) for p in part.parameters()),
        "masters_fp32": {p.dtype for g in engine.optimizer.optimizer.param_groups for p in g["params"]},
        "optimizer": type(engine.optimizer).__name__,
        "optimizer_clip": engine.optimizer.clip_grad,
        "teacher_fp32_unrounded": all(torch.equal(p, q) for p, q in zip(model.teacher.parameters(),
                                                                        reference.teacher.parameters())),
        "codebook_fp32": all(b.dtype == torch.float32 for b in model.codebook.buffers() if b.is_floating_point()),
        "batchnorm_stats_match": batchnorm.running_mean.dtype == batchnorm.weight.dtype == torch.bfloat16,
        "clip": engine.gradient_clipping(),
        "groups": sorted(g["name"] for g in engine.optimizer.param_groups),
    }
    for g in engine.optimizer.param_groups:
        g["lr"] = 1e-3
    momentum = 0.9
    teacher0 = [p.detach().clone() for p in model.teacher.parameters()]
    student0 = [p.detach().float().clone() for p in model.encoder.parameters()]
    trainable = [p.requires_grad for p in model.encoder.parameters()]
    g = torch.Generator().manual_seed(1)
    batches = iter([(torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)) for _ in range(2)])
    totals = LossTotals(dist_info.device)
    train_step(engine, batches, momentum, torch.bfloat16, totals)
    facts["finite"] = totals.drain()["loss"]
    facts["optimizer_steps"] = engine.global_steps
    facts["codebook_ptr"] = int(model.codebook.ptr)
    facts["teacher_is_one_ema"] = all(  # fixed tensors (pos_embed) are not averaged
        torch.allclose(t, momentum * t0 + (1 - momentum) * s0, rtol=EMA_RTOL, atol=0) if ema else torch.equal(t, t0)
        for t, t0, s0, ema in zip(model.teacher.parameters(), teacher0, student0, trainable))
    facts["teacher_still_fp32"] = all(p.dtype == torch.float32 for p in model.teacher.parameters())
    facts["student_moved"] = any(not torch.equal(p.float(), s0) for p, s0 in zip(model.encoder.parameters(), student0)
                                 if p.requires_grad)
    if zero_stage == 0:
        facts["resume_exact"] = _resumes_exactly(engine, cfg, dist_info, momentum)
    results[zero_stage] = facts


def _resumes_exactly(engine, cfg, dist_info, momentum) -> bool:
    """Saves `engine` (moca_fast.train.checkpoint), steps it once more, and steps a second engine, built from
    other weights and loaded from that checkpoint, on the same batches and seed: same module state and fp32
    masters, bit for bit."""
    import tempfile

    from moca_fast.model.moca import MOCA
    from moca_fast.train.checkpoint import load_checkpoint, save_checkpoint
    from moca_fast.train.engine import build_engine
    from moca_fast.train.step import LossTotals, train_step

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)) for _ in range(2)]
    states = []
    with tempfile.TemporaryDirectory() as output:
        folder = save_checkpoint(engine, output, 1, {}, {"world_size": 1, "config": cfg.to_dict()}, keep=1)
        torch.manual_seed(1)
        second, _ = build_engine(MOCA(cfg, 1), cfg, dist_info, "bf16")
        load_checkpoint(second, folder, 1)
        for e in (engine, second):
            for group in e.optimizer.param_groups:
                group["lr"] = 1e-3
            torch.manual_seed(5)  # the same masks and codebook draw (words: torch, view: Python's random)
            random.seed(5)
            train_step(e, iter(batches), momentum, torch.bfloat16, LossTotals(dist_info.device))
            states.append(({k: v.clone() for k, v in e.module.state_dict().items()},
                           [p.clone() for group in e.optimizer.optimizer.param_groups for p in group["params"]]))
    (module_a, masters_a), (module_b, masters_b) = states
    return (module_a.keys() == module_b.keys() and all(torch.equal(module_a[k], module_b[k]) for k in module_a)
            and all(torch.equal(a, b) for a, b in zip(masters_a, masters_b)))


#: DeepSpeed 0.19.8's optimiser wrapper per ZeRO stage in bf16: ZeRO 0 (no partitioning) takes its bf16 data-parallel
#: path, FP16_UnfusedOptimizer with bf16 gradients and fp32 master copies (its BF16_Optimizer serves ZeRO-1 with
#: fp32 gradient accumulation and pipelines only)
BF16_WRAPPERS = {0: "FP16_UnfusedOptimizer", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer"}


@pytest.mark.parametrize("zero_stage", [2, 1, 0])
def test_bf16_engine_keeps_teacher_and_codebook_fp32_and_updates_once_per_step(zero_stage):
    results = mp.Manager().dict()
    mp.spawn(_engine_facts, args=(free_port(), zero_stage, results), nprocs=1, join=True)
    facts = results[zero_stage]
    assert facts["student_bf16"] and facts["codebook_fp32"] and facts["batchnorm_stats_match"]
    assert facts["masters_fp32"] == {torch.float32} and facts["optimizer"] == BF16_WRAPPERS[zero_stage]
    assert facts["teacher_fp32_unrounded"], "DeepSpeed's bf16 cast must not touch the teacher"
    assert facts["clip"] == facts["optimizer_clip"] == 0.1
    assert facts["groups"] == ["decay", "no_decay", "wgen_decay", "wgen_no_decay"]
    assert facts["optimizer_steps"] == 1, "grad_accum=2: two micro-steps, one optimiser step"
    assert facts["codebook_ptr"] == 4, "tiny: 4 new words once per optimiser step, not per micro-step"
    assert facts["teacher_is_one_ema"] and facts["teacher_still_fp32"]
    assert facts["student_moved"] and facts["finite"] == facts["finite"]
    assert facts.get("resume_exact", zero_stage != 0), "ZeRO 0: a resumed engine steps exactly as the saved one"


def _fast_engine_facts(rank, port, results):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from moca_fast.model.fastpath import MatmulPatchEmbed
    from moca_fast.model.moca import MOCA
    from moca_fast.train.engine import build_engine, init_distributed

    dist_info = init_distributed()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 4, 3, 64, 64, generator=g).to(torch.bfloat16)
    losses, names, options = {}, {}, {}
    for impl, compile_blocks in (("reference", "auto"), ("fast", "auto"), ("fast", "on")):
        run = f"{impl}/{compile_blocks}"
        cfg = load_config("tiny", overrides=dict(impl=impl, compile_blocks=compile_blocks))
        torch.manual_seed(0)
        engine, _ = build_engine(MOCA(cfg, 1), cfg, dist_info, "bf16")
        model = engine.module
        names[run] = sorted(model.state_dict())
        options[run] = getattr(model, "fast_options", None)
        if impl == "fast":
            results["patch_embed_gemm"] = all(isinstance(m.patch_embed, MatmulPatchEmbed)
                                              for m in (model.encoder, model.teacher))
        torch.manual_seed(2)  # the same masks and codebook draw (words: torch, view: Python's random)
        random.seed(2)
        loss, _ = engine(x1, x2, momentum=0.99)
        engine.backward(loss)
        engine.step()
        losses[run] = loss.item()
        results[f"grad_norm {run}"] = engine.get_global_grad_norm()
    from torch._dynamo.utils import counters

    results["compiled_graphs"] = counters["stats"]["unique_graphs"]
    results["same_state_dict_names"] = len({tuple(n) for n in names.values()}) == 1
    results["losses"], results["options"] = losses, options


def test_trainer_engine_with_impl_fast_takes_the_fast_path_and_matches_reference():
    """impl=fast in the trainer's engine: the GEMM patch embedding in student and teacher, compiled blocks
    when compile_blocks=on (inductor; auto leaves them off on the CPU), the same checkpoint names, and for
    the same weights, inputs, masks and codebook draw, the bf16 loss and grad norm of impl=reference
    within the bf16 bar (1e-2 relative) through a full engine step."""
    from moca_fast.model.fastpath import FastOptions

    results = mp.Manager().dict()
    mp.spawn(_fast_engine_facts, args=(free_port(), results), nprocs=1, join=True)
    assert results["patch_embed_gemm"] and results["same_state_dict_names"]
    assert results["options"] == {"reference/auto": None,
                                  "fast/auto": FastOptions(bf16_weights=False, compile_blocks=False),
                                  "fast/on": FastOptions(bf16_weights=False, compile_blocks=True)}
    assert results["compiled_graphs"] == 5, "fast/on: encoder and decoder at each round's length, and the teacher"
    ref, ref_norm = results["losses"]["reference/auto"], results["grad_norm reference/auto"]
    assert math.isfinite(ref) and math.isfinite(ref_norm) and ref_norm > 0
    for run in ("fast/auto", "fast/on"):
        assert abs(results["losses"][run] - ref) <= 1e-2 * abs(ref), (run, results["losses"])
        assert abs(results[f"grad_norm {run}"] - ref_norm) <= 1e-2 * ref_norm, (run, ref_norm)
