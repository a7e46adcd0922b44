"""moca_fast.io: official checkpoint import, the weights_only allow-list, our model file, timm export, CLI.

The official-format checkpoint under test is tests/golden's, written by the official code itself
(scripts/parity_official.py), so its key set and layout are the real ones.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from jpeg_folder import write_run_folder
from moca_fast import build_model
from moca_fast.errors import CheckpointError
from moca_fast.io import export_teacher_timm, load_model, load_official, official_to_ours, save_model, timm_spec
from moca_fast.io.__main__ import main as cli
from moca_fast.io.official import DROPPED_KEYS, KAPPA_KEYS

GOLDEN_CKPT = Path(__file__).resolve().parent / "golden" / "tiny_official_checkpoint.pth"
TIMM_TOLERANCE = 1e-5  # absolute, teacher tokens of O(1) magnitude (LayerNorm output)


class Foreign:
    """A class that is not on the allow-list."""


def _golden():
    return torch.load(GOLDEN_CKPT, weights_only=False)


def _write_variant(tmp_path, edit, name="variant.pth"):
    ckpt = _golden()
    edit(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_load_official_maps_every_tensor():
    ckpt = _golden()
    model = load_official(GOLDEN_CKPT, "tiny")
    ours = model.state_dict()
    loaded = 0
    for key, value in ckpt["model"].items():
        if key in KAPPA_KEYS:
            assert float(model.kappa) == float(value)
        elif key not in DROPPED_KEYS:
            assert torch.equal(ours[official_to_ours(key)], value), key
            loaded += 1
    assert loaded == len(ours) - 1  # everything but the config-set kappa
    # the trained state really differs from a fresh model's (so this test can tell loaded from built)
    assert int(model.codebook.ptr) == 12 and float(model.codebook.dist_norm_prev) != 0.5
    assert not torch.equal(model.teacher.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["model"].pop("encoder_teacher.norm.weight"), "missing entries .*encoder_teacher.norm.weight"),
    (lambda c: c["model"].pop("bow_extractor.bow_extractor.0._dist_norm_prev"), "missing .*_dist_norm_prev"),
    (lambda c: c["model"].pop("decoder_pred.scale"), "missing .*decoder_pred.scale"),
    (lambda c: c["model"].__setitem__("encoder.extra_token", torch.zeros(1)), "unexpected .*encoder.extra_token"),
    (lambda c: c["model"].__setitem__("head.weight", torch.zeros(1)), "unexpected .*head.weight"),
    (lambda c: c["model"].__setitem__("mask_token_cls_pt", torch.zeros(1, 1, 8)), "shape mismatch .*mask_token_cls_pt"),
    (lambda c: c["model"].__setitem__("encoder_pred.scale", torch.tensor([5.0])), "encoder_pred.scale .*kappa"),
    (lambda c: setattr(c["args"], "inv_delta", 15.0), "inv_delta=15.0"),
    (lambda c: setattr(c["args"], "model", "moca_vit_base_patch16_dec2"), "num_heads=12 .*patch16_dec2.* has num_heads=2"),
    (lambda c: c.pop("model"), "no 'model' entry"),
    (lambda c: c.__setitem__("model", [1, 2]), "'model' is not a state dict"),
    (lambda c: c.__setitem__("args", {"kappa": 3.0}), "'args' is a dict"),
])
def test_bad_official_checkpoints_get_one_line_errors(tmp_path, edit, expected):
    path = _write_variant(tmp_path, edit)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_official(path, "tiny")
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_config_must_match_the_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="scale \\(kappa\\) is \\[3.0\\] but preset 'tiny' has kappa=5.0"):
        load_official(GOLDEN_CKPT, "tiny", kappa=5.0)
    with pytest.raises(CheckpointError, match="early_layer=1 .* has early_layer=2"):
        load_official(GOLDEN_CKPT, "tiny", early_layer=2)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_official(GOLDEN_CKPT, "tiny", num_words=128)
    with pytest.raises(CheckpointError, match="unexpected entries .*decoder"):
        load_official(GOLDEN_CKPT, "tiny", loc_weight=0.0)
    # without args only the tensors can be checked; κ still is
    path = _write_variant(tmp_path, lambda c: (c.pop("args"), c["model"]["decoder_pred.scale"].fill_(4.0)))
    with pytest.raises(CheckpointError, match="decoder_pred.scale .*kappa=4"):
        load_official(path, "tiny")


def test_files_that_are_not_official_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(GOLDEN_CKPT.read_bytes()[:5000])
    plain = tmp_path / "plain.pth"
    torch.save(_golden()["model"], plain)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    cases = {garbage: "not a PyTorch checkpoint", truncated: "not a PyTorch checkpoint",
             plain: "plain state dict", a_list: "expected a dict", tmp_path / "absent.pth": "no such file"}
    for path, expected in cases.items():
        with pytest.raises(CheckpointError, match=expected):
            load_official(path, "tiny")


def test_weights_only_allows_exactly_argparse_namespace(tmp_path):
    foreign = _write_variant(tmp_path, lambda c: c.__setitem__("extra", Foreign()), "foreign.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle .*Foreign .*argparse.Namespace"):
        load_official(foreign, "tiny")
    in_args = _write_variant(tmp_path, lambda c: setattr(c["args"], "device", torch.device("cpu")), "dev.pth")
    load_official(in_args, "tiny")  # torch.device is a weights_only default, not an addition of ours
    # the Namespace is allowed only inside load_official, not globally
    with pytest.raises(Exception, match="Namespace"):
        torch.load(GOLDEN_CKPT, weights_only=True)


def test_native_model_file_round_trip(tmp_path):
    model = load_official(GOLDEN_CKPT, "tiny")
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    assert again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="not a moca_fast model file"):
        load_model(GOLDEN_CKPT)


def _timm_from_export(path, name, kwargs):
    net = timm.create_model(name, pretrained=False, **kwargs)
    timm.models.load_checkpoint(net, str(path), strict=True)
    return net.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_export_round_trip(tmp_path, suffix):
    model = build_model("tiny")
    with torch.no_grad():  # a teacher that differs from the student: the export must take the teacher
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"teacher{suffix}"
    name, kwargs = export_teacher_timm(model, path)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["timm_model"] == name and json.loads(meta["timm_kwargs"]) == kwargs
    net = _timm_from_export(path, name, kwargs)
    x = torch.randn(2, 3, model.config.img_size, model.config.img_size)
    with torch.no_grad():
        ours = model.teacher(x)[1]
        theirs = net.forward_features(x)
        student = model.encoder(x)[1]
    assert theirs.shape == ours.shape == (2, 1 + model.config.num_patches, model.config.embed_dim)
    assert (theirs - ours).abs().max() < TIMM_TOLERANCE
    assert (theirs - student).abs().max() > 100 * TIMM_TOLERANCE


@pytest.mark.parametrize("preset, name", [("vit_base_dec2", "vit_base_patch16_224"),
                                          ("vit_large_dec2", "vit_large_patch16_224"),
                                          ("vit_small_dec2", "vit_small_patch16_224")])
def test_timm_spec_of_paper_sizes_builds_the_same_layout(preset, name):
    from moca_fast.config import load_config
    from moca_fast.model.vit import ViTEncoder

    cfg = load_config(preset)
    got_name, kwargs = timm_spec(cfg)
    assert got_name == name
    with torch.device("meta"):
        net = timm.create_model(got_name, pretrained=False, **kwargs)
        ours = ViTEncoder(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                          cfg.mlp_ratio, cfg.norm_eps)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert net.blocks[0].attn.num_heads == cfg.num_heads and net.norm.eps == cfg.norm_eps


def test_cli_import_and_export(tmp_path, capsys):
    assert cli(["import", str(GOLDEN_CKPT), "--preset", "tiny", "--out", str(tmp_path / "m.pt")]) == 0
    assert "ptr=12" in capsys.readouterr().out
    assert cli(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert cli(["export", str(GOLDEN_CKPT), "--preset", "tiny", "--out", str(tmp_path / "b.pth")]) == 0
    assert "timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0" in capsys.readouterr().out
    a = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
    teacher = {k[len("encoder_teacher."):]: v for k, v in _golden()["model"].items() if k.startswith("encoder_teacher.")}
    assert a.keys() == teacher.keys() and all(torch.equal(a[k], teacher[k]) for k in a)
    assert cli(["export", str(GOLDEN_CKPT), "--out", str(tmp_path / "c.pth")]) == 2
    assert "needs --preset" in capsys.readouterr().err
    assert cli(["import", str(GOLDEN_CKPT), "--preset", "tiny", "--set", "kappa=5"]) == 2
    assert cli(["import", str(GOLDEN_CKPT), "--preset", "tiny", "--set", "no_such_field=1"]) == 2


def test_cli_exports_the_teacher_of_a_training_run(tmp_path):
    from moca_fast.config import load_config

    model = build_model("tiny")
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_run_folder(tmp_path / "run", model, load_config("tiny"))
    assert cli(["export", str(tmp_path / "run"), "--out", str(tmp_path / "t.pth")]) == 0
    exported = torch.load(tmp_path / "t.pth", weights_only=True)
    teacher = model.teacher.state_dict()
    assert exported["state_dict"].keys() == teacher.keys()
    assert all(torch.equal(exported["state_dict"][k], teacher[k]) for k in teacher)
    assert cli(["export", str(tmp_path), "--out", str(tmp_path / "u.pth")]) == 2, "a folder with no checkpoint"


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    run = subprocess.run([sys.executable, "-m", "moca_fast.io", "import", str(bad), "--preset", "tiny"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and str(bad) in run.stderr
    for command in ("import", "export"):
        with pytest.raises(SystemExit) as info:
            cli([command, "--help"])
        assert info.value.code == 0
