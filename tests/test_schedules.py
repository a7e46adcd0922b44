"""Schedules and parameter groups against hand-derived values of the official recipe
(valeoai/MOCA util/misc.py semantics). Tolerance: 1e-12 absolute (double-precision arithmetic)."""
import math

import pytest
import torch

from moca_fast import build_model
from moca_fast.config import load_config
from moca_fast.errors import ConfigError
from moca_fast.model.moca import MOCA
from moca_fast.train.schedules import Schedules, apply_schedules, parameter_groups, peak_lr

TOL = 1e-12


def _schedules(**overrides) -> Schedules:
    cfg = load_config("vit_base_dec2", overrides=overrides)
    return Schedules.from_config(cfg, world_size=8)


def test_peak_lr_is_blr_times_effective_batch_over_256():
    cfg = load_config("vit_base_dec2", overrides=dict(batch_size=256, grad_accum=2))
    assert peak_lr(cfg, 8) == pytest.approx(1.5e-4 * 256 * 2 * 8 / 256, abs=TOL)
    assert peak_lr(cfg.replace(lr=0.5), 8) == 0.5, "an explicit lr wins over blr"


def test_lr_warmup_then_half_cosine_to_zero_at_int_epochs_times_mul():
    s = _schedules(epochs=200, warmup_epochs=30, lr_epochs_mul=1.25)
    lr = s.lr
    assert s.lr_epochs == 250
    assert s.learning_rate(0.0) == 0.0
    assert s.learning_rate(15.0) == pytest.approx(lr / 2, abs=TOL)
    assert s.learning_rate(30.0) == pytest.approx(lr, abs=TOL)
    assert s.learning_rate(140.0) == pytest.approx(lr / 2, abs=TOL), "cosine midpoint of [30, 250]"
    # end of training (epoch 200): 170 of 220 cosine epochs done, so the lr ends above 0
    expected_end = lr * 0.5 * (1 + math.cos(math.pi * 170 / 220))
    assert s.learning_rate(200.0) == pytest.approx(expected_end, abs=TOL)
    assert expected_end > 0.05 * lr
    assert s.learning_rate(250.0) == pytest.approx(0.0, abs=TOL)
    assert s.learning_rate(251.0) == 0.0


def test_lr_epochs_truncates_like_the_official_int():
    s = _schedules(epochs=3, warmup_epochs=1, lr_epochs_mul=1.25)
    assert s.lr_epochs == 3, "int(3 * 1.25) = 3, not 3.75"
    assert s.learning_rate(3.0) == pytest.approx(0.0, abs=TOL)


def test_weight_decay_and_momentum_half_cosines_over_the_run():
    s = _schedules(epochs=100, weight_decay=0.05, weight_decay_end=0.2, momentum_start=0.994)
    assert s.weight_decay_at(0.0) == pytest.approx(0.05, abs=TOL)
    assert s.weight_decay_at(50.0) == pytest.approx(0.125, abs=TOL)
    assert s.weight_decay_at(100.0) == pytest.approx(0.2, abs=TOL)
    assert s.momentum(0.0) == pytest.approx(0.994, abs=TOL)
    assert s.momentum(50.0) == pytest.approx(0.997, abs=TOL)
    assert s.momentum(100.0) == pytest.approx(1.0, abs=TOL)
    assert s.momentum(120.0) == 1.0
    assert _schedules(momentum_cosine=False).momentum(50.0) == 0.994


def test_generators_keep_their_constant_lr_and_wd_even_in_warmup():
    s = _schedules(epochs=100, warmup_epochs=10, lr_wgen=1e-4, weight_decay_wgen=0.05)
    for epoch in (0.0, 5.0, 60.0, 99.9):
        values = s.group_values(epoch)
        assert values["wgen_decay"] == (1e-4, 0.05)
        assert values["wgen_no_decay"] == (1e-4, 0.0)
        assert values["no_decay"] == (s.learning_rate(epoch), 0.0)
        assert values["decay"] == (s.learning_rate(epoch), s.weight_decay_at(epoch))


def test_warmup_longer_than_the_lr_schedule_is_rejected():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        _schedules(epochs=10, warmup_epochs=20)


def test_parameter_groups_split_decay_and_generators_and_skip_frozen():
    model = build_model("tiny")
    groups = {g["name"]: g["params"] for g in parameter_groups(model, MOCA.GENERATOR_PREFIXES)}
    assert set(groups) == {"no_decay", "decay", "wgen_no_decay", "wgen_decay"}
    name_of = {id(p): n for n, p in model.named_parameters()}
    placed = [name_of[id(p)] for params in groups.values() for p in params]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(placed) == sorted(trainable), "every trainable tensor in exactly one group"
    assert not any(n.startswith("teacher.") or n.endswith("pos_embed") for n in placed)
    for group, params in groups.items():
        for p in params:
            name = name_of[id(p)]
            assert name.startswith(MOCA.GENERATOR_PREFIXES) == group.startswith("wgen_"), name
            no_decay = p.ndim <= 1 or name.endswith(".bias")
            assert no_decay == group.endswith("no_decay"), name
    assert "encoder.cls_token" in [name_of[id(p)] for p in groups["decay"]], "cls_token is 3-D: decayed"


def test_apply_schedules_writes_lr_and_wd_into_named_groups():
    model = build_model("tiny")
    groups = parameter_groups(model, MOCA.GENERATOR_PREFIXES)
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    s = _schedules(epochs=10, warmup_epochs=2)
    apply_schedules(optimizer.param_groups, s, 1.0)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["decay"]["lr"] == pytest.approx(s.lr / 2, abs=TOL)
    assert by_name["decay"]["weight_decay"] == pytest.approx(s.weight_decay_at(1.0), abs=TOL)
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["wgen_decay"]["lr"] == s.lr_wgen
