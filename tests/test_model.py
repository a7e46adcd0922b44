"""The MOCA model: KL losses against hand-derived values, gradients, the fp32 EMA, one-step lag."""
import math

import pytest
import torch

import moca_fast.model.moca as moca_module
from moca_fast import build_model
from moca_fast.reference_ops import assign_reference, soft_target_kl_reference


def test_kl_loss_hand_derived():
    """kappa = ln 3 makes softmax([kappa, 0]) = [3/4, 1/4]."""
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    protos = torch.eye(2)
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # row 1: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3); row 2: ln(1/0.75) (0 log 0 = 0)
    expected = (0.5 * math.log(4 / 3) + math.log(4 / 3)) / 2
    loss = soft_target_kl_reference(f, protos, math.log(3), target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_assignment_hand_derived():
    words = torch.eye(3)[:2]  # e1, e2 in R^3
    tokens = torch.zeros(1, 9, 3)
    tokens[0, :, 0] = 2.0  # every token along e1 (normalised to e1)
    tokens[0, 4] = torch.tensor([0.0, 5.0, 0.0])  # the centre token along e2
    codes, bow, stat = assign_reference(tokens, words, torch.tensor([math.log(3)]), torch.tensor([4]))
    assert torch.allclose(codes[0, 0], torch.tensor([0.75, 0.25]))
    assert torch.allclose(codes[0, 4], torch.tensor([0.25, 0.75]))
    assert torch.allclose(bow[0], torch.tensor([0.25, 0.75])), "bow pools the interior tokens only"
    assert stat.item() == pytest.approx(0.5), "max cos 1 minus mean cos 0.5, for every token"


def _views(model, b=4):
    s = model.config.img_size
    return torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)


def test_gradients_reach_every_trainable_tensor_and_nothing_else():
    model = build_model("tiny")
    model.train()
    loss, stats = model(*_views(model), momentum=0.99)
    assert loss.item() == pytest.approx(0.5 * stats["img"].item() + 0.5 * stats["loc"].item(), rel=1e-6)
    loss.backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("img_generator.") for n in trainable) and "decoder.mask_token" in trainable
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    for name, p in model.named_parameters():
        if name.startswith("teacher.") or name.endswith("pos_embed"):
            assert not p.requires_grad and p.grad is None, name
    assert not model.codebook.words.requires_grad and not model.kappa.requires_grad
    assert "kappa" not in trainable and not any(n.startswith("codebook.") for n in trainable)


def test_teacher_ema_stays_fp32_where_bf16_would_stall():
    model = build_model("tiny")
    model.encoder.to(torch.bfloat16)  # a bf16 student, as under DeepSpeed bf16
    with torch.no_grad():
        for t, s in zip(model.teacher.parameters(), model.encoder.parameters()):
            t.fill_(1.0)
            s.fill_(2.0)
    m = 0.999
    model.update_teacher(m)
    w = model.teacher.blocks[0].attn.qkv.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.full_like(w, 1.001), rtol=0, atol=1e-6)
    bf16 = torch.ones(1, dtype=torch.bfloat16) * m + torch.full((1,), 2.0, dtype=torch.bfloat16) * (1 - m)
    assert bf16.item() == 1.0, "the same update in bf16 rounds back to 1.0: a bf16 EMA stalls"


def test_teacher_not_updated_when_momentum_is_one_or_update_teacher_false():
    model = build_model("tiny")
    model.train()
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    words = model.codebook.words.clone()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1)
    model(*_views(model), momentum=0.9, update_teacher=False)
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert torch.equal(words, model.codebook.words) and model.codebook.ptr.item() == 0
    model(*_views(model), momentum=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert model.codebook.ptr.item() == 4, "the codebook still receives its words"


def test_targets_use_previous_steps_dist_norm(monkeypatch):
    model = build_model("tiny")
    model.train()
    seen = []
    original = moca_module.teacher_targets

    def spy(t1, t2, words, inv_temp, interior, impl, products=None):
        seen.append((inv_temp.item(), words.clone()))
        return original(t1, t2, words, inv_temp, interior, impl, products)

    monkeypatch.setattr(moca_module, "teacher_targets", spy)
    model(*_views(model), momentum=0.99)
    after_step1 = model.codebook.dist_norm.item()
    assert model.codebook.dist_norm_prev.item() == after_step1
    model(*_views(model), momentum=0.99, update_teacher=False)  # a micro-step: dist_norm moves, the lag does not
    model(*_views(model), momentum=0.99)
    assert seen[0][0] == pytest.approx(10 / 0.5)
    assert seen[1][0] == pytest.approx(10 / after_step1, rel=1e-6)
    assert seen[2][0] == pytest.approx(10 / after_step1, rel=1e-6)
    assert not torch.equal(seen[0][1], seen[1][1]), "step 2 sees the codebook updated at the end of step 1"


def test_given_masks_make_forward_deterministic():
    model = build_model("tiny")
    model.train()
    x1, x2 = _views(model)
    masks = model.sample_masks(8, "cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    l1, _ = model(x1, x2, 1.0, masks=masks, update_teacher=False)
    model.load_state_dict(state)
    l2, _ = model(x1, x2, 1.0, masks=masks, update_teacher=False)
    assert l1.item() == l2.item()
