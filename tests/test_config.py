"""Config presets, overrides and the one-line validation errors."""
import pytest

from moca_fast.config import Config, load_config
from moca_fast.config_parse import parse_kv
from moca_fast.config_presets import PRESETS
from moca_fast.errors import ConfigError


def test_paper_defaults():
    c = Config()
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) == (224, 16, 768, 12, 12)
    assert (c.num_words, c.num_new_words, c.inv_delta, c.kappa, c.skip_offset, c.early_layer) == (4096, 32, 10.0, 3.0, 2, 4)
    assert c.mask_ratio == (0.55, 0.75) and c.dec_mask_ratio == (0.35, 0.55)
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 2, 16)
    assert (c.img_weight, c.loc_weight, c.blr, c.lr_wgen, c.clip_grad, c.momentum_start) == (0.5, 0.5, 1.5e-4, 1e-4, 0.1, 0.994)
    assert (c.weight_decay, c.weight_decay_end, c.warmup_epochs, c.lr_epochs_mul) == (0.05, 0.20, 30, 1.25)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_validate(preset):
    load_config(preset).validate(world_size=1)


def test_overrides_are_typed():
    cfg = load_config("tiny", overrides=parse_kv(["depth=5", "mask_ratio=0.5,0.7", "lr=none", "momentum_cosine=false"]))
    assert cfg.depth == 5 and cfg.mask_ratio == (0.5, 0.7) and cfg.lr is None and cfg.momentum_cosine is False


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\nembed_dim: 48\n")
    cfg = load_config(None, p, {"depth": 4})
    assert cfg.embed_dim == 48 and cfg.depth == 4 and cfg.img_size == 64


@pytest.mark.parametrize("overrides, message", [
    (dict(mask_ratio=(0.999, 0.75)), "leaves no visible token"),
    (dict(dec_mask_ratio=(0.6, 0.55)), "must be smaller than mask_ratio[0]"),
    (dict(mask_ratio=(0.4, 0.75), dec_mask_ratio=(0.1, 0.55)), "complementary masks do not fit"),
    (dict(num_words=102), "not a multiple of the 4 words"),
    (dict(num_new_words=64), "exceeds the 4 images per rank"),
    (dict(img_size=60), "not a multiple of patch_size"),
    (dict(early_layer=3), "early_layer=3 must be in [0, depth=3)"),
    (dict(skip_offset=4), "leaves no interior token"),
    (dict(impl="cuda"), "impl='cuda'"),
    (dict(embed_dim=36, num_heads=5), "embed_dim=36 is not divisible by num_heads=5"),
])
def test_impossible_settings_rejected_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=overrides).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_words_per_step_depends_on_world_size_and_sync():
    cfg = load_config("tiny", overrides=dict(num_new_words=4, num_words=64))
    assert cfg.words_per_step(2) == 2
    assert cfg.replace(codebook_sync="gather").words_per_step(2) == 4
    with pytest.raises(ConfigError, match="gives no new word per rank"):
        cfg.validate(world_size=8)


def test_unknown_and_malformed_settings():
    with pytest.raises(ConfigError, match="unknown setting 'dept'"):
        load_config("tiny", overrides={"dept": 3})
    with pytest.raises(ConfigError, match="setting depth='three'"):
        load_config("tiny", overrides={"depth": "three"})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("vit_huge")


@pytest.mark.parametrize("setting", ["blr=-1", "kappa=-1", "lr=-1", "weight_decay=-5", "clip_grad=-1", "clip_grad=nan",
                                     "inv_delta=0", "dist_norm_decay=2", "warmup_epochs=-3", "knn_k=0", "seed=-1",
                                     "adam_betas=0.9,1.5", "blr=inf", "mask_ratio=0.5", "knn_temperature=0",
                                     "in_chans=1", "cpu_threads=-1", "crop_min=nan", "momentum_start=0"])
def test_out_of_range_values_rejected_with_one_line(setting):
    name = setting.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=parse_kv([setting])).validate()
    assert str(e.value).startswith(f"{name}=") and " must " in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_field_has_a_range():
    import dataclasses
    import typing

    from moca_fast.config_checks import FIELD_RANGES

    hints = typing.get_type_hints(Config)
    numeric = {f.name for f in dataclasses.fields(Config) if hints[f.name] in (int, float, tuple, float | None,
                                                                                int | None)}
    assert numeric - {"zero_stage"} == set(FIELD_RANGES), "zero_stage is a choice of {0, 1, 2}"
    for stage in (0, 1, 2):
        load_config("tiny", overrides=dict(zero_stage=stage)).validate()


def test_paths_checked_in_one_line(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for overrides, message in [(dict(output=str(a_file)), "is an existing file, not a folder"),
                               (dict(output=str(a_file / "run")), f"cannot be created: {a_file} is a file"),
                               (dict(data=str(tmp_path / "none")), "no such folder"),
                               (dict(knn_train=str(tmp_path)), "set both")]:
        with pytest.raises(ConfigError) as e:
            load_config("tiny", overrides={"output": str(tmp_path / "run"), **overrides}).validate().check_paths()
        assert message in str(e.value) and "\n" not in str(e.value)
    load_config("tiny", overrides=dict(output=str(tmp_path / "new" / "run"), data=str(tmp_path))).validate().check_paths()


def test_the_trainer_refuses_an_output_that_is_a_file_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    proc = subprocess.run([sys.executable, "launch/train.py", "--preset", "tiny", "--data-backend", "synthetic",
                           "--output", str(a_file)], cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: output={a_file} is an existing file, not a folder"
