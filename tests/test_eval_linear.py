"""Linear probe: the parallel heads train exactly as independent nn.Linear + SGD + cosine runs, and the
CLI's numbers equal that plain PyTorch computation on features computed here."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval_data import make_eval_data, make_run, tiny_cfg, tiny_model
from moca_fast.data import build_eval_loader, scan_images
from moca_fast.eval import linear

WEIGHT_TOL = 1e-5  # fp32: one einsum over stacked heads vs separate matmuls


def reference_probe(train_x, train_y, val_x, val_y, lrs, epochs, batch_size, seed, init):
    """Independent heads, torch.optim.SGD + CosineAnnealingLR each; the documented batch order
    (randperm(N, seed + epoch), full batches). Returns (heads, per-epoch top-1 [epochs, H])."""
    heads, optims, scheds = [], [], []
    for (w, b), lr in zip(init, lrs):
        head = nn.Linear(train_x.shape[1], w.shape[0])
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0)
        heads.append(head), optims.append(opt), scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs))
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            for head, opt in zip(heads, optims):
                opt.zero_grad()
                F.cross_entropy(head(train_x[idx]), train_y[idx]).backward()
                opt.step()
        for sched in scheds:
            sched.step()
        with torch.no_grad():
            history.append([100.0 * float((h(val_x).argmax(1) == val_y).double().mean()) for h in heads])
    return heads, torch.tensor(history)


def test_parallel_heads_match_independent_sgd_runs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 12, generator=g), torch.randint(0, 4, (50,), generator=g)
    vx, vy = torch.randn(20, 12, generator=g), torch.randint(0, 4, (20,), generator=g)
    lrs, epochs, batch = [0.01, 0.3, 2.0], 4, 8
    heads = linear.LinearHeads(12, 4, len(lrs))
    init = [(w.detach().clone(), b.detach().clone()) for w, b in zip(heads.weight, heads.bias)]
    optimizer, schedule = linear.heads_optimizer(heads, lrs, epochs)
    for epoch in range(epochs):
        for feats, labels in linear.cached_batches(x, y, batch, epoch, seed=5):
            linear.train_step(heads, optimizer, feats, labels)
        schedule.step()
    ref, ref_history = reference_probe(x, y, vx, vy, lrs, epochs, batch, 5, init)
    for h, head in enumerate(ref):
        assert torch.allclose(heads.weight[h], head.weight, atol=WEIGHT_TOL, rtol=0), h
        assert torch.allclose(heads.bias[h], head.bias, atol=WEIGHT_TOL, rtol=0), h
    counts = linear.head_accuracy(heads, vx, vy)
    assert torch.allclose(100.0 * counts[:, 0].double() / 20, ref_history[-1].double())
    assert len(linear.LEARNING_RATES) == 45 and linear.LEARNING_RATES[0] == 1e-4 and linear.LEARNING_RATES[-1] == 9.0


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear_eval")
    return make_run(root / "run"), make_eval_data(root / "data")


def _features(model, folder):
    """[CLS] ‖ [AVG] of the teacher's final tokens, computed here with the plain teacher forward."""
    images = scan_images(folder)
    feats, labels = [], []
    with torch.no_grad():
        for x, y, _ in build_eval_loader(images, tiny_cfg(), batch_size=5):
            _, tokens = model.teacher(x)
            feats.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def test_cached_cli_equals_a_plain_pytorch_probe(run_and_data, tmp_path):
    run, data = run_and_data
    lrs, epochs, batch = [0.5, 5.0, 50.0], 3, 4
    out = tmp_path / "linear.json"
    argv = ["--checkpoint", str(run), "--data", str(data), "--cached", "--epochs", str(epochs), "--batch-size",
            str(batch), "--lr", *map(str, lrs), "--output", str(out), "--num-workers", "0"]
    assert linear.main(argv) == 0
    result = json.loads(out.read_text())

    model = tiny_model()
    train_x, train_y = _features(model, data / "train")
    val_x, val_y = _features(model, data / "val")
    torch.manual_seed(0)  # the CLI's --seed: the heads' initial weights
    init_heads = linear.LinearHeads(train_x.shape[1], 3, len(lrs))
    init = [(w.detach(), b.detach()) for w, b in zip(init_heads.weight, init_heads.bias)]
    _, history = reference_probe(train_x, train_y, val_x, val_y, [lr * batch / 256 for lr in lrs], epochs, batch, 0,
                                 init)
    assert result["protocol"] == "linear" and result["features"] == "cls_avg"
    assert torch.allclose(torch.tensor(result["final_top1"]).double(), history[-1].double())
    assert result["top1"] == pytest.approx(float(history.max()))


def test_augmented_probe_runs_end_to_end(run_and_data, tmp_path):
    run, data = run_and_data
    out = tmp_path / "linear_aug.json"
    assert linear.main(["--checkpoint", str(run), "--data", str(data), "--epochs", "2", "--batch-size", "4",
                        "--features", "avg", "--output", str(out), "--num-workers", "0"]) == 0
    result = json.loads(out.read_text())
    assert len(result["history"]) == 2 and len(result["history"][-1]["top1"]) == 45
    assert all(torch.isfinite(torch.tensor(h["train_loss"])).all() for h in result["history"])
    assert 0 <= result["top1"] <= 100 and result["cached"] is False
