"""Parity of moca_fast's reference path with the official implementation (valeoai/MOCA), in fp32 on the CPU.

    python scripts/parity_official.py /path/to/MOCA-checkout [--write-golden tests/golden]

Builds their MOCA with a seeded configuration equal to our "tiny" preset, trains it for a few steps (so
student, teacher, codebook queue, dist_norm and BatchNorm statistics all differ from their initial
values), saves it as an official checkpoint ({"model", "optimizer", "epoch", "scaler", "args"}), loads that
with moca_fast.io.load_official, then runs one training-mode forward/backward of both on the same inputs
and masks (momentum 1.0, update_teacher=False) and prints the relative differences of L_img, L_loc, the
total loss, the teacher codes and bag-of-words, dist_norm after the step, and every student gradient.
Exit status 1 when any of them exceeds 1e-5 relative.

--write-golden DIR writes the checkpoint and the official outputs for tests/test_parity_golden.py.

    python scripts/parity_official.py /path/to/MOCA-checkout --steps 32 [--setup tiny vit_b] [--accum 1 2]

trains both for N optimiser steps instead (scripts/parity_training.py: the official train_one_epoch
against our train_step on the DeepSpeed engine, same weights, batches, masks and codebook draws) and
prints a per-step table and the worst relative difference per quantity next to the official code's own
difference under a permuted batch. Exit status 1 when ours exceeds the bound (parity_compare.bounded).
With --write-golden DIR it also writes the golden file of tests/test_parity_training_golden.py.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from moca_fast.config import load_config
from moca_fast.io import load_official, official_to_ours
from moca_fast.model.masks import make_two_complementary_masks
from moca_fast.reference_ops import assign_reference

PRESET = "tiny"
SEED = 0
BATCH = 4  # images per view
WARMUP_STEPS = 3
TOLERANCE = 1e-5
GOLDEN_CHECKPOINT = "tiny_official_checkpoint.pth"
GOLDEN_OUTPUTS = "tiny_official_outputs.pt"
#: student gradients kept in the golden file (our names)
GOLDEN_GRADS = ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.0.attn.qkv.weight",
                "encoder.norm.weight", "img_generator.mlp.0.weight", "img_generator.mlp.3.weight",
                "dense_generator.skip.weight", "decoder.embed.weight", "decoder.mask_token",
                "decoder.blocks.0.mlp.fc2.weight")


def parity_inputs(cfg, seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two views x1, x2 [B, 3, H, W] and the two masking rounds [2B, L], from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    masks = make_two_complementary_masks(2 * batch, cfg.num_patches, cfg.len_keep(), cfg.len_dec(), generator=g)
    return x[0], x[1], masks


def official_args(cfg) -> argparse.Namespace:
    """The fields of main_pretrain.py's args that MOCA.forward reads, plus those load_official checks."""
    return argparse.Namespace(
        model="moca_tiny_parity", input_size=cfg.img_size, kappa=cfg.kappa, inv_delta=cfg.inv_delta,
        num_words=cfg.num_words, num_new_words=cfg.num_new_words, early_layer=cfg.early_layer,
        pred_mlp_ratio=cfg.pred_mlp_ratio, mask_ratio=list(cfg.mask_ratio), dec_mask_ratio=list(cfg.dec_mask_ratio),
        avg_pooling=True, num_mviews=2, img_weight=cfg.img_weight, loc_weight=cfg.loc_weight)


def build_official(models_moca, cfg) -> nn.Module:
    return models_moca.MOCA(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_embed_dim,
        decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), inv_delta=cfg.inv_delta, num_words=cfg.num_words,
        num_new_words=cfg.num_new_words, skip_offset=cfg.skip_offset, kappa=cfg.kappa,
        pred_mlp_ratio=cfg.pred_mlp_ratio, early_layer=cfg.early_layer, use_loc_loss=cfg.loc_weight > 0)


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """Their codebook update moves an index tensor with .cuda(); on this CPU run it must stay put."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def fixed_masks(misc, masks: list[torch.Tensor], len_keep: tuple[int, int]):
    """Makes their make_two_complementary_masks return our masks."""
    original = misc.make_two_complementary_masks
    misc.make_two_complementary_masks = lambda *args, **kwargs: ([m.clone() for m in masks], list(len_keep))
    try:
        yield
    finally:
        misc.make_two_complementary_masks = original


def warm_up(official: nn.Module, args: argparse.Namespace, cfg) -> torch.optim.Optimizer:
    """A few real training steps (SGD, EMA momentum 0.9, codebook updates) on random images."""
    official.train()
    optimizer = torch.optim.SGD([p for p in official.parameters() if p.requires_grad], lr=0.05)
    with cuda_calls_stay_on_cpu():
        for _ in range(WARMUP_STEPS):
            x1, x2 = torch.randn(2, BATCH, cfg.in_chans, cfg.img_size, cfg.img_size)
            loss, _ = official(x1, x2, 0.9, args, update_teacher=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad()
    return optimizer


def run_official(official, misc, args, cfg, x1, x2, masks) -> dict:
    """One training-mode forward/backward of their model; returns losses, codes, bow, dist_norm, grads."""
    captured = {}

    def keep_targets(module, inputs, output):
        bows, codes = output
        captured.setdefault("bow", []).append(bows[0])
        captured.setdefault("codes", []).append(codes[0])

    handle = official.bow_extractor.register_forward_hook(keep_targets)
    official.train()
    official.zero_grad()
    try:
        with fixed_masks(misc, masks, cfg.len_keep()):
            loss, stats = official(x1, x2, 1.0, args, update_teacher=False)
    finally:
        handle.remove()
    loss.backward()
    grads = {official_to_ours(n): p.grad.detach().clone() for n, p in official.named_parameters() if p.grad is not None}
    return dict(loss=loss.detach(), loss_img=torch.tensor(stats["losses"]["img"]),
                loss_loc=torch.tensor(stats["losses"]["loc"]), codes=torch.cat(captured["codes"]),
                bow=torch.cat(captured["bow"]), dist_norm=official.bow_extractor.bow_extractor[0]._dist_norm.clone(),
                grads=grads)


def run_ours(model, x1, x2, masks) -> dict:
    """The same step on our reference path; codes/bow from assign_reference on our teacher tokens."""
    model.train()
    model.zero_grad()
    cb = model.codebook
    with torch.no_grad():
        tokens = torch.cat([model.teacher_tokens(x1), model.teacher_tokens(x2)])
        codes, bow, _ = assign_reference(tokens, cb.words, cb.inv_temperature(), cb.interior)
    loss, stats = model(x1, x2, 1.0, masks=masks, update_teacher=False)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(loss=loss.detach(), loss_img=stats["img"], loss_loc=stats["loc"], codes=codes, bow=bow,
                dist_norm=cb.dist_norm.clone(), grads=grads)


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max|ours - theirs| / max|theirs| (a scalar: |a - b| / |b|)."""
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def compare(ours: dict, theirs: dict) -> dict[str, float]:
    """Relative differences of every compared quantity; fails if the gradient sets differ."""
    diffs = {k: relative_difference(ours[k], theirs[k])
             for k in ("loss_img", "loss_loc", "loss", "codes", "bow", "dist_norm")}
    if set(ours["grads"]) != set(theirs["grads"]):
        raise SystemExit(f"gradient sets differ: only ours {sorted(set(ours['grads']) - set(theirs['grads']))}, "
                         f"only theirs {sorted(set(theirs['grads']) - set(ours['grads']))}")
    grad_diffs = {n: relative_difference(ours["grads"][n], g) for n, g in theirs["grads"].items()}
    worst = max(grad_diffs, key=grad_diffs.get)
    diffs[f"grads (worst of {len(grad_diffs)}: {worst})"] = grad_diffs[worst]
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("official_dir", type=Path, help="checkout of github.com/valeoai/MOCA")
    parser.add_argument("--write-golden", type=Path, metavar="DIR", help="write the golden files here")
    parser.add_argument("--steps", type=int, default=0, metavar="N", help="train N optimiser steps (0: one step)")
    parser.add_argument("--setup", nargs="+", default=["tiny"], choices=["tiny", "vit_b"])
    parser.add_argument("--accum", nargs="+", type=int, default=[1, 2], help="gradient accumulation steps")
    parser.add_argument("--steps-per-epoch", type=int, default=10, help="optimiser steps per epoch")
    parser.add_argument("--noise-runs", type=int, default=2, help="official runs with permuted batches")
    parser.add_argument("--official-clip-norm", choices=["float64", "torch"], default="float64",
                        help="the official run's gradient clipping: its total norm accumulated in float64 (as "
                             "DeepSpeed does ours), or torch's clip_grad_norm_ as is (fp32 norm; on the CPU it loses "
                             "~1e-4 relative on ViT-B-sized tensors)")
    opts = parser.parse_args(argv)
    if not (opts.official_dir / "models_moca.py").is_file():
        parser.error(f"{opts.official_dir}: no models_moca.py (not a valeoai/MOCA checkout)")
    if opts.steps:
        import parity_compare

        return parity_compare.main(opts)
    sys.path.insert(0, str(opts.official_dir.resolve()))
    import models_moca
    import util.misc as misc

    cfg = load_config(PRESET)
    torch.manual_seed(SEED)
    random.seed(SEED)
    official = build_official(models_moca, cfg)
    args = official_args(cfg)
    optimizer = warm_up(official, args, cfg)

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = opts.write_golden or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = out_dir / GOLDEN_CHECKPOINT
        torch.save({"model": official.state_dict(), "optimizer": optimizer.state_dict(), "epoch": WARMUP_STEPS - 1,
                    "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 0},
                    "args": args}, checkpoint)
        model = load_official(checkpoint, PRESET)

        x1, x2, masks = parity_inputs(cfg, SEED + 1, BATCH)
        theirs = run_official(official, misc, args, cfg, x1, x2, masks)
        ours = run_ours(model, x1, x2, masks)
        if opts.write_golden:
            golden = {k: v for k, v in theirs.items() if k != "grads"}
            golden.update(seed=SEED + 1, batch=BATCH, masks=masks, inputs_sum=torch.stack([x1.sum(), x2.sum()]),
                          grads={n: theirs["grads"][n] for n in GOLDEN_GRADS})
            torch.save(golden, out_dir / GOLDEN_OUTPUTS)
            print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e3:.0f} kB) and {out_dir / GOLDEN_OUTPUTS} "
                  f"({(out_dir / GOLDEN_OUTPUTS).stat().st_size / 1e3:.0f} kB)")

    print(f"official: L_img={float(theirs['loss_img']):.8f} L_loc={float(theirs['loss_loc']):.8f} "
          f"dist_norm_prev={float(model.codebook.dist_norm_prev):.6f} ptr={int(model.codebook.ptr)}")
    diffs = compare(ours, theirs)
    width = max(map(len, diffs))
    for name, d in diffs.items():
        print(f"  {name:<{width}}  rel diff {d:.3e}  {'ok' if d <= TOLERANCE else 'FAIL'}")
    failed = [n for n, d in diffs.items() if d > TOLERANCE]
    print(f"parity {'FAILED: ' + ', '.join(failed) if failed else 'ok'} (tolerance {TOLERANCE:g} relative, fp32)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
