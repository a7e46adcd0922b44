"""Where the model's numerics follow the official code: the patch conv's default bias init, and fp32
teacher tokens (the final LayerNorm's output) for the assignment and the codebook update in a bf16 run."""
import torch
import torch.nn as nn

import moca_fast.model.moca as moca_module
from moca_fast import build_model
from moca_fast.config import load_config
from moca_fast.model.losses import teacher_targets


def test_patch_conv_bias_keeps_pytorchs_conv2d_default_init():
    """The official code never re-initialises the patch conv's bias: it is nn.Conv2d's own draw. The conv is
    the first module MOCA builds, so under the same seed a fresh nn.Conv2d draws the same bias."""
    cfg = load_config("tiny")
    torch.manual_seed(3)
    model = moca_module.MOCA(cfg, 1)
    torch.manual_seed(3)
    conv = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
    bias = model.encoder.patch_embed.proj.bias
    assert torch.equal(bias, conv.bias) and bias.abs().min() > 0
    assert torch.equal(model.teacher.patch_embed.proj.bias, bias), "the teacher starts as a copy"
    assert not torch.equal(model.encoder.patch_embed.proj.weight, conv.weight), "the weight is xavier-initialised"


def test_bf16_run_assigns_and_updates_the_codebook_from_fp32_teacher_tokens(monkeypatch):
    """bf16 inputs and a bf16 student (the trainer's): the teacher runs under bf16 autocast, and the tokens
    reaching the assignment and the codebook update are its final LayerNorm's fp32 output, not rounded to bf16."""
    model = build_model("tiny").train()
    for student in (model.encoder, model.decoder):
        student.to(torch.bfloat16)  # as DeepSpeed's bf16 mode does
    seen = {}
    original = moca_module.teacher_targets

    def spy(t1, t2, words, inv_temp, interior, impl, products=None):
        seen["targets"] = (t1, products)
        return original(t1, t2, words, inv_temp, interior, impl, products)

    step = model.codebook.step
    monkeypatch.setattr(moca_module, "teacher_targets", spy)
    monkeypatch.setattr(model.codebook, "step", lambda tokens: (seen.setdefault("step", tokens), step(tokens)))
    s = model.config.img_size
    x1, x2 = (torch.randn(4, 3, s, s).to(torch.bfloat16) for _ in range(2))
    model(x1, x2, momentum=0.99)
    tokens, products = seen["targets"]
    assert products == torch.bfloat16, "the fused ops' teacher products follow the teacher's autocast"
    for t in (tokens, seen["step"]):
        assert t.dtype == torch.float32
        assert not torch.equal(t, t.to(torch.bfloat16).float()), "fp32 values, not bf16 ones widened"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, final = model.teacher(x1)
    assert torch.equal(model.teacher_tokens(x1), final[:, 1:]), "the final LayerNorm's output, as it is"


def test_fused_assignment_takes_its_product_dtype_from_the_teacher_outside_autocast():
    """The trainer has no autocast: with products=bf16 the fused assignment of fp32 tokens gives exactly what it
    gives under bf16 autocast, and not its exact-fp32 result (products=None there)."""
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(2, 16, 32, generator=g) for _ in range(2)]
    words = nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    inv_temp, interior = torch.tensor([20.0]), torch.tensor([5, 6, 9, 10])
    bf16, _ = teacher_targets(*tokens, words, inv_temp, interior, "fast", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = teacher_targets(*tokens, words, inv_temp, interior, "fast")
    fp32, _ = teacher_targets(*tokens, words, inv_temp, interior, "fast")
    assert bf16.products == torch.bfloat16 and torch.equal(bf16.bow, autocast.bow)
    assert not torch.equal(bf16.bow, fp32.bow)
