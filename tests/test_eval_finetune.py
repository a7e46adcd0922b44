"""Fine-tuning through timm: the official layer-decay scales, the teacher's weights in timm's ViT, an
end-to-end run, and exact resume from the per-epoch checkpoint."""
import json

import pytest
import torch

from eval_data import make_eval_data, make_run, tiny_model
from moca_fast.eval import finetune
from moca_fast.io.teacher import load_teacher


def test_classifier_holds_the_teacher_and_official_layer_scales(tmp_path):
    import timm.optim

    model = tiny_model()
    teacher = load_teacher(str(make_run(tmp_path / "run", model)), None, "cpu")
    net = finetune.build_classifier(teacher, num_classes=5, drop_path=0.2)
    ours = model.teacher.state_dict()
    for name, value in net.state_dict().items():
        if name in ours:
            assert torch.equal(value, ours[name]), name
    assert float(net.head.weight.detach().std()) < 1e-4 and torch.equal(net.fc_norm.weight, torch.ones(32))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # global pool + fc_norm over the teacher's un-normed tokens, then the head
        net.eval()
        pre = net.forward_features(x)[:, 1:].mean(1)
        assert torch.allclose(net.forward_head(net.forward_features(x)), net.head(net.fc_norm(pre)), atol=1e-6)
    groups = timm.optim.param_groups_layer_decay(net, 0.05, net.no_weight_decay(), layer_decay=0.65)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    depth = 3  # official: stem 0.65^(depth+1), block i 0.65^(depth-i), head / fc_norm 1
    assert scale[id(net.patch_embed.proj.weight)] == pytest.approx(0.65 ** (depth + 1))
    assert scale[id(net.blocks[0].attn.qkv.weight)] == pytest.approx(0.65 ** depth)
    assert scale[id(net.blocks[2].mlp.fc2.weight)] == pytest.approx(0.65)
    assert scale[id(net.head.weight)] == scale[id(net.fc_norm.weight)] == 1.0
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(net.pos_embed)] == decay[id(net.cls_token)] == decay[id(net.blocks[0].norm1.weight)] == 0.0
    assert decay[id(net.blocks[0].attn.qkv.weight)] == 0.05


def _argv(run, data, out, *extra):
    return ["--checkpoint", str(run), "--data", str(data), "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "4", "--num-workers", "0", "--output", str(out), *extra]


def _final_state(out):
    folder = out.parent / f"{out.stem}_checkpoints"
    name = (folder / "latest").read_text().strip()
    return torch.load(folder / name / "model.pt", weights_only=True)


def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
    run, data = make_run(tmp_path / "run"), make_eval_data(tmp_path / "data")
    straight = tmp_path / "straight.json"
    assert finetune.main(_argv(run, data, straight)) == 0
    result = json.loads(straight.read_text())
    assert result["protocol"] == "finetune" and result["epochs_done"] == 2 and len(result["history"]) == 2
    assert result["top1"] == max(h["top1"] for h in result["history"])

    split = tmp_path / "split.json"
    assert finetune.main(_argv(run, data, split, "--max-epochs", "1")) == 0
    assert json.loads(split.read_text())["epochs_done"] == 1
    assert finetune.main(_argv(run, data, split)) == 2, "an existing checkpoint needs --resume auto"
    assert finetune.main(_argv(run, data, split, "--resume", "auto")) == 0
    a, b = _final_state(straight), _final_state(split)
    assert a["epoch"] == b["epoch"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert json.loads(split.read_text())["history"] == result["history"]
