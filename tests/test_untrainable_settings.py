"""Settings that cannot train are refused before any work, in one line naming them (exit 2), through
launch/train.py's main (tiny preset, synthetic data, a real DeepSpeed engine on gloo); an overflow inside the
optimiser step is the non-finite step it is (exit 3, nothing saved)."""
import pytest

from moca_fast import config
from moca_fast.config import load_config
from moca_fast.errors import ConfigError
from test_safety import _finite_checkpoints, _launch


@pytest.mark.parametrize("settings, line", [
    (["num_words=1", "num_new_words=1"], "error: num_words=1 must be at least 2: the prototype generators' BatchNorm "
                                         "normalises over the codebook's words"),
    (["lr=1e38"], "error: lr=1e+38 overflows the optimiser's float32 step (lr 1e+38: first step lr / (1 - "
                  "adam_betas[0]) = 1e+39, weight decay factor lr * wd = 2e+37; float32 holds at most 3.403e+38)"),
    (["blr=1e39"], "error: blr=1e+39 is beyond float32's range (at most 3.403e+38), the optimiser's dtype"),
    (["kappa=-1e300"], "error: kappa=-1e+300 must be > 0"),
    (["inv_delta=1e300"], "error: inv_delta=1e+300 is beyond float32's range (at most 3.403e+38), the optimiser's "
                          "dtype"),
])
def test_a_setting_that_cannot_train_is_one_line_before_any_work(one_process_group, tmp_path, capfd, settings, line):
    out = tmp_path / "run"
    assert _launch(["--output", str(out)] + settings) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert [e for e in err if e.startswith("error")] == [line] and err[-1] == line, err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_the_largest_learning_rates_that_fit_are_accepted():
    cfg = load_config("tiny", None, {"lr": 3.4e37, "weight_decay_end": 10.0})
    assert cfg.validate() is cfg
    with pytest.raises(ConfigError, match=r"^lr_wgen=1e\+38 overflows"):
        cfg.replace(lr_wgen=1e38).validate()
    many_ranks = {"blr": 1e37, "batch_size": 64, "grad_accum": 2, "num_new_words": 8}  # lr = blr * 1024 / 256
    assert load_config("tiny", None, many_ranks).validate(world_size=4)
    with pytest.raises(ConfigError, match=r"^blr=1e\+37 overflows .* \(lr 4e\+37: first step .* = 4e\+38, "
                                          r"weight decay factor lr \* wd = 8e\+36;"):
        load_config("tiny", None, many_ranks).validate(world_size=8)
    with pytest.raises(ConfigError, match=r"^num_words=1 must be at least 2"):
        load_config("tiny", None, {"num_words": 1, "num_new_words": 1}).validate()


def test_an_overflow_inside_the_optimiser_step_is_a_non_finite_step(one_process_group, tmp_path, capfd, monkeypatch):
    """Without the setting's check, lr=1e38 overflows inside AdamW (torch raises "value cannot be converted to type
    float without overflow"): the run stops as on a non-finite loss, with status 3 and nothing saved."""
    monkeypatch.setattr(config, "check_optimiser_step_size", lambda cfg, world_size: None)
    out = tmp_path / "run"
    assert _launch(["--output", str(out), "--max-steps", "3", "ckpt_every=1", "lr=1e38", "warmup_epochs=0"]) == 3
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: the optimiser step overflowed float32 (value cannot be converted to type float "
                              "without overflow); stopping without saving"), err[-1]
    assert _finite_checkpoints(out) == []
