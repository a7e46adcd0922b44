"""moca_fast.model.fastpath: the GEMM patch embedding, bf16 weights with fp32 masters, and the
fast-prepared model against the reference path (impl=reference on both sides, so only
prepare_fast differs; the fused kernels have their own tests). torch.compile of the blocks is traced
here with the "aot_eager" backend. Inductor compiles them (to C++ on the CPU) in the trainer's engine
test (tests/test_engine.py); its Triton code for the GPU runs only on a device (bench/device_check.sh).
"""
import copy
import random

import pytest
import torch
import torch.nn as nn

from moca_fast.model.fastpath import (RECOMPILE_LIMIT, FastOptions, MatmulPatchEmbed, MixedPrecisionAdamW,
                                     compile_backend, prepare_fast, trainer_fast_options)
from moca_fast.config import load_config
from moca_fast.errors import ConfigError
from moca_fast.model.moca import build_model
from moca_fast.model.vit import Block
from moca_fast.train.schedules import parameter_groups

EAGER = FastOptions(compile_blocks=False)


def test_matmul_patch_embed_equals_conv():
    conv = nn.Conv2d(3, 24, kernel_size=8, stride=8)
    x = torch.randn(3, 3, 40, 32)
    want = conv(x).flatten(2).transpose(1, 2)
    got = MatmulPatchEmbed(conv)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: summation order only


def _float_dtypes(part: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in list(part.parameters()) + list(part.buffers()) if t.is_floating_point()}


def test_prepare_fast_keeps_names_and_fp32_teacher():
    """bf16 weights: encoder and decoder; teacher, generators and codebook fp32 (in the trainer DeepSpeed casts the
    generators too: tests/test_engine.py)."""
    model = build_model("tiny")
    names = set(model.state_dict())
    prepare_fast(model, EAGER)
    assert set(model.state_dict()) == names
    for part in (model.encoder, model.decoder):
        assert _float_dtypes(part) == {torch.bfloat16}
    for part in (model.teacher, model.img_generator, model.dense_generator, model.codebook):
        assert _float_dtypes(part) == {torch.float32}


def test_trainer_fast_options_follow_impl_compile_setting_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)

    def options(impl, compile_blocks, device, budget=0.8):
        cfg = load_config("tiny", overrides=dict(impl=impl, compile_blocks=compile_blocks,
                                                 activation_memory_budget=budget))
        return trainer_fast_options(cfg, device)

    assert options("reference", "auto", cuda) is None
    assert options("fast", "auto", cpu) == FastOptions(bf16_weights=False, compile_blocks=False)
    assert options("fast", "auto", cuda) == FastOptions(bf16_weights=False, compile_blocks=True)
    assert options("fast", "off", cuda) == FastOptions(bf16_weights=False, compile_blocks=False)
    assert options("reference", "on", cpu) == FastOptions(bf16_weights=False, matmul_patch_embed=False,
                                                          compile_blocks=True)
    assert options("fast", "auto", cuda, 0.8).activation_memory_budget == 0.8
    with pytest.raises(ConfigError, match="activation_memory_budget=0"):
        load_config("tiny", overrides=dict(activation_memory_budget=0.0)).validate(1)


def _same_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 3 for p in params]


def test_mixed_precision_adamw_matches_fp32_adamw():
    """bf16 parameters with fp32 masters step exactly like fp32 AdamW fed the same (bf16) gradients."""
    torch.manual_seed(0)
    fp32 = [torch.randn(5, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
    low = [p.detach().to(torch.bfloat16).requires_grad_() for p in fp32]
    masters_start = [p.detach().to(torch.bfloat16).float() for p in fp32]
    for p, m in zip(fp32, masters_start):
        p.data.copy_(m)  # both start from the same, bf16-representable values
    kw = dict(lr=1e-2, weight_decay=0.05, betas=(0.9, 0.999))
    ref = torch.optim.AdamW([{"params": fp32}], **kw)
    opt = MixedPrecisionAdamW([{"params": low}], clip_grad=0.1, **kw)
    for step in range(3):
        grads = _same_grads(fp32, step)
        for p, q, g in zip(fp32, low, grads):
            q.grad = g.to(torch.bfloat16)
            p.grad = q.grad.float()
        want_norm = torch.nn.utils.clip_grad_norm_(fp32, 0.1)
        ref.step()
        norm = opt.step()
        opt.zero_grad()
        torch.testing.assert_close(norm, want_norm, rtol=1e-6, atol=0)
        for p, (q, m) in zip(fp32, opt.low_precision):
            torch.testing.assert_close(m, p.detach(), rtol=1e-6, atol=1e-7)  # fp32 masters
            assert torch.equal(q.detach(), m.detach().to(torch.bfloat16))  # params = rounded masters
            assert q.grad is None and m.grad is None


def test_fp32_parameters_are_their_own_masters():
    p = torch.randn(4, requires_grad=True)
    opt = MixedPrecisionAdamW([{"params": [p]}], clip_grad=None, lr=0.1)
    assert opt.masters[0] is p and opt.low_precision == []
    p.grad = torch.ones(4)
    before = p.detach().clone()
    assert opt.step() is None
    assert not torch.equal(p.detach(), before)


def _loss_and_grads(model, x1, x2, masks):
    torch.manual_seed(1)  # the codebook's word draw
    random.seed(1)  # and its view (Python's random)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(x1.to(torch.bfloat16), x2.to(torch.bfloat16), 0.99, masks=masks)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_fast_prepared_model_matches_reference():
    """Same weights, inputs, masks; both under bf16 autocast: loss and every gradient within bf16 noise.

    Tolerances: loss 1e-2 relative (DESIGN's bf16 bar); gradients 5e-2 in relative L2 norm per tensor
    (bf16 weights and a bf16 residual stream against fp32 ones, accumulated over two masking rounds).
    """
    torch.manual_seed(0)
    ref = build_model("tiny")
    fast = prepare_fast(copy.deepcopy(ref), EAGER)
    B = ref.config.batch_size
    x1, x2 = torch.randn(2, B, 3, ref.config.img_size, ref.config.img_size)
    masks = ref.sample_masks(2 * B, "cpu")
    loss_ref, grads_ref = _loss_and_grads(ref, x1, x2, masks)
    loss_fast, grads_fast = _loss_and_grads(fast, x1, x2, masks)
    assert torch.isfinite(loss_ref)
    assert abs(loss_fast - loss_ref) <= 1e-2 * abs(loss_ref)
    assert grads_fast.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        err = (grads_fast[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= 5e-2, f"{name}: relative gradient error {err:.3g}"


def _trajectory(model, data, steps, lr):
    """Per-step losses of `steps` optimiser steps (lr 0: forward only, the untrained yardstick)."""
    groups = parameter_groups(model, model.GENERATOR_PREFIXES)
    for group in groups:
        group["lr"], group["weight_decay"] = lr, 0.05
    opt = MixedPrecisionAdamW(groups, clip_grad=0.1)
    torch.manual_seed(1)  # masks and codebook draws: the same stream in every run
    random.seed(1)  # (the codebook's view: Python's random)
    losses = []
    for step in range(steps):
        x1, x2 = data[step % len(data)]
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(lr > 0):
            loss, _ = model(x1.to(torch.bfloat16), x2.to(torch.bfloat16), 0.99)
        if lr > 0:
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_loss_trajectory_follows_reference():
    """200 steps on the tiny preset (16 tokens) from the same start, data and masks: the fast-prepared
    model's losses stay within bf16 noise of the reference path's.

    Tolerances: mean |fast - reference| per step <= 2 % of the mean loss and <= 10 % of what training
    changes (mean |untrained - reference|); the mean losses of the last 50 steps within 2 %.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and steadier
    try:
        torch.manual_seed(0)
        start = build_model("tiny", img_size=32, skip_offset=1)
        B, S = start.config.batch_size, start.config.img_size
        data = torch.randn(8, 2, B, 3, S, S)
        ref = _trajectory(copy.deepcopy(start), data, 200, lr=1e-3)
        fast = _trajectory(prepare_fast(copy.deepcopy(start), EAGER), data, 200, lr=1e-3)
        untrained = _trajectory(copy.deepcopy(start), data, 200, lr=0.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(ref).all() and torch.isfinite(fast).all()
    training_effect = (untrained - ref).abs().mean()
    assert ref[-50:].mean() < 0.8 * untrained[-50:].mean(), "the reference run must learn"
    gap = (fast - ref).abs().mean()
    assert gap <= 0.02 * ref.mean() and gap <= 0.1 * training_effect, (gap, training_effect)
    assert abs(fast[-50:].mean() - ref[-50:].mean()) <= 0.02 * ref[-50:].mean()


@pytest.mark.parametrize("budget", [1.0, 0.8])
def test_compiled_blocks_trace_whole_and_compute_the_same(budget):
    """Compiled blocks (dynamo and AOTAutograd with the "aot_eager" backend: inductor's tracing, joint
    graph and min-cut partition, without its code generation, so it runs here in seconds) trace without a
    graph break, compile once per distinct input shape (under a memory budget too: every block shares one
    backend), and give the uncompiled model's loss and gradients.
    Tolerances (fp32): loss 1e-6 relative; gradients 1e-5 in relative L2 norm per tensor (DESIGN's fp32
    bar; the compiled backward sums in another order, measured ~2e-7).

    The sequence is what a training run does with the blocks: two training steps (student rounds of 12 and
    4 tokens + [CLS], decoder lengths 11 and 7 + [AVG], the teacher at 17), then k-NN features at two batch
    sizes: 7 shapes, each compiled once, within RECOMPILE_LIMIT.
    """
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = build_model("tiny")
    compiled = prepare_fast(copy.deepcopy(eager), FastOptions(bf16_weights=False, matmul_patch_embed=False,
                                                              compile_backend="aot_eager",
                                                              activation_memory_budget=budget))
    torch._dynamo.reset()
    counters.clear()
    B, S = eager.config.batch_size, eager.config.img_size
    for step in range(2):
        x1, x2 = torch.randn(2, B, 3, S, S)
        masks = eager.sample_masks(2 * B, "cpu")
        seed = torch.seed()
        results = []
        for model in (eager, compiled):
            torch.manual_seed(seed)  # the same codebook draw (words: torch, view: Python's random)
            random.seed(seed)
            loss, _ = model(x1, x2, 0.99, masks=masks)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
            model.zero_grad()
        (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
        assert grads_compiled.keys() == grads_eager.keys()
        for name, g in grads_eager.items():
            err = (grads_compiled[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert err <= 1e-5, f"{name}: relative gradient error {err:.3g}"
    for n in (7, 3):
        x = torch.randn(n, 3, S, S)
        torch.testing.assert_close(compiled.teacher_features(x), eager.teacher_features(x), rtol=1e-6, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == counters["frames"]["ok"] == 7
    assert counters["stats"]["unique_graphs"] == 7 <= RECOMPILE_LIMIT


def _saved_values_per_token_channel(block, x):
    """Output, input gradient, and the values the compiled forward keeps for the backward (parameters
    excluded) per token and channel; x: [B, T, C]."""
    y = block(x)
    params = {p.data_ptr() for p in block.parameters()}
    saved = sum(t.numel() for t in y.grad_fn.saved_tensors if t.data_ptr() not in params)
    y.square().sum().backward()
    return y.detach(), x.grad, saved / x.numel()


def test_activation_memory_budget_keeps_fewer_activations_for_the_same_result():
    """An inductor-compiled block (C++ here; the forward/backward partition is decided before code
    generation, as on the GPU): at budget 0.8 it keeps at most 80 % of the values it keeps at 1.0 (measured
    16.2 -> 10.2 per token and channel: the LayerNorm and GELU outputs are recomputed), with the same
    output and input gradient (fp32: 1e-5 relative)."""
    torch.manual_seed(0)
    block = Block(32, 2, 4.0, 1e-6)
    x = torch.randn(4, 17, 32)
    results = {}
    for budget in (1.0, 0.8):
        compiled = copy.deepcopy(block)
        compiled.compile(backend=compile_backend("inductor", budget), dynamic=False)
        results[budget] = _saved_values_per_token_channel(compiled, x.clone().requires_grad_())
    (y_full, g_full, kept_full), (y_budget, g_budget, kept_budget) = results[1.0], results[0.8]
    assert kept_budget <= 0.8 * kept_full, (kept_budget, kept_full)
    torch.testing.assert_close(y_budget, y_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_budget, g_full, rtol=1e-5, atol=1e-6)
