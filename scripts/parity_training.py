"""Multi-step training parity with the official implementation: the pieces behind `parity_official.py --steps N`.

One seeded Plan fixes everything random: the initial weights (drawn here, not by either code's
initialiser), every micro-batch (x1, x2), every micro-batch's two masking rounds and every optimiser
step's codebook draw (which view, which images, which interior token). Both sides get them injected:
- official: main_pretrain.initialize_optimizer and main_pretrain.train_one_epoch called as they are, once
  per epoch, on a list "loader"; only what a CPU run cannot do is patched: Tensor.cuda and
  torch.cuda.synchronize are no-ops, and main() is not called (no DDP: at world size 1 it is a numerical
  no-op; args.lr_epochs is set with main()'s expression). Their masks come through
  misc.make_two_complementary_masks, their draws through random.random / torch.randperm / torch.randint
  inside BoWExtractor.update;
- ours: moca_fast.train.step.train_step on the DeepSpeed engine of moca_fast.train.engine.build_engine
  (gloo, world size 1, fp32), the schedules applied as Trainer does (Trainer.epoch_float, apply_schedules,
  Schedules.momentum); masks through MOCA.sample_masks, draws through OnlineCodebook.step's randperm /
  randint and the view it is given.
Recorded per optimiser step: the micro-batch means of loss / L_img / L_loc, the pre-clip gradient norm, lr
and weight decay of the four groups, the momentum, dist_norm, dist_norm_prev, the codebook words and
pointer; at the end every tensor of the model state (our names) and AdamW's exp_avg / exp_avg_sq / step.
The comparison, its bounds and the golden file: parity_compare.py.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moca_fast.config import Config, load_config
from moca_fast.model.codebook import interior_token_ids
from moca_fast.model.masks import make_two_complementary_masks

HERE = Path(__file__).resolve().parent
GROUPS = ("no_decay", "decay", "wgen_no_decay", "wgen_decay")  # the official initialize_optimizer order
#: optimisation settings of every parity run (the rest: the preset's, i.e. the paper's recipe).
#: blr makes lr = 1e-3 per 4 images, so 30 steps move the weights well beyond rounding; momentum 0.9
#: makes the teacher follow visibly; the weight decay cosine runs 0.05 -> 0.20.
COMMON = dict(epochs=4, warmup_epochs=1.0, blr=0.064, momentum_start=0.9, weight_decay=0.05,
              weight_decay_end=0.20, clip_grad=0.1, impl="reference", precision="fp32", attention="sdpa")
#: name -> (preset, overrides); the batch is the number of images per view and micro-batch
SETUPS = {
    "tiny": ("tiny", dict(batch_size=4, num_new_words=4)),
    "vit_b": ("vit_base_dec2", dict(batch_size=2, num_new_words=2)),
}
STEP_SCALARS = ("loss", "loss_img", "loss_loc", "grad_norm", "momentum", "dist_norm", "dist_norm_prev")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Plan:
    cfg: Config
    steps: int
    steps_per_epoch: int  # optimiser steps
    seed: int
    batches: list = field(default_factory=list)  # per micro-batch: (x1, x2) [B, 3, H, W]
    masks: list = field(default_factory=list)  # per micro-batch: two ids_shuffle [2B, L]
    draws: list = field(default_factory=list)  # per step: (view 0/1, image permutation [B], interior idx [n])
    initial: dict = field(default_factory=dict)  # our state-dict names -> tensors

    @property
    def accum(self) -> int:
        return self.cfg.grad_accum

    @property
    def loader_len(self) -> int:
        return self.steps_per_epoch * self.accum


def make_config(setup: str, accum: int) -> Config:
    preset, overrides = SETUPS[setup]
    return load_config(preset, overrides={**COMMON, **overrides, "grad_accum": accum}).validate(1)


def initial_state(model, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Initial weights drawn from `g` in state-dict order (independent of both codes' initialisers):
    matrices xavier-uniform, 1-D weights 1 + N(0, 0.1²), biases and tokens N(0, 0.02²), codebook
    normalize(clamp(randn, 0)); the fixed sin-cos position embeddings and BatchNorm statistics as
    built; the teacher a copy of the student."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, t in state.items():
        if name.startswith(("teacher.", "codebook.")) or "pos_embed" in name or not t.is_floating_point():
            continue
        if "running_" in name:
            continue
        if name.endswith("weight") and t.ndim >= 2:
            fan_out, fan_in = t.shape[0], t[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            state[name] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
        elif name.endswith("weight"):
            state[name] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif name != "kappa":
            state[name] = 0.02 * torch.randn(t.shape, generator=g)
    for name in list(state):
        if name.startswith("teacher."):
            state[name] = state["encoder." + name[len("teacher."):]].clone()
    words = state["codebook.words"]
    state["codebook.words"] = F.normalize(torch.randn(words.shape, generator=g).clamp(min=0), dim=1, eps=1e-5)
    return state


def make_plan(setup: str, steps: int, accum: int, seed: int, steps_per_epoch: int = 10) -> Plan:
    from moca_fast.model.moca import MOCA

    cfg = make_config(setup, accum)
    plan = Plan(cfg, steps, steps_per_epoch, seed)
    g = torch.Generator().manual_seed(seed)
    plan.initial = initial_state(MOCA(cfg, 1), g)
    B, shape = cfg.batch_size, (cfg.in_chans, cfg.img_size, cfg.img_size)
    interior = interior_token_ids(cfg.grid_size, cfg.skip_offset).numel()
    for _ in range(steps):
        for _ in range(accum):
            plan.batches.append((torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)))
            plan.masks.append(make_two_complementary_masks(2 * B, cfg.num_patches, cfg.len_keep(), cfg.len_dec(),
                                                           generator=g))
        view = int(torch.randint(0, 2, (), generator=g))
        plan.draws.append((view, torch.randperm(B, generator=g),
                           torch.randint(0, interior, (cfg.num_new_words,), generator=g)))
    return plan


def inputs_checksum(plan: Plan) -> torch.Tensor:
    """Sums that change if the seeded plan changes (torch RNG): inputs, masks, draws, initial weights."""
    return torch.stack([sum(x1.sum() + x2.sum() for x1, x2 in plan.batches),
                        sum(float(m.float().mul(torch.arange(m.shape[1])).sum()) for ms in plan.masks for m in ms)
                        * torch.ones(()),
                        sum(float(p.float() @ torch.arange(1.0, len(p) + 1) + i.sum() + v) for v, p, i in plan.draws)
                        * torch.ones(()),
                        sum(t.double().abs().sum() for t in plan.initial.values() if t.is_floating_point()).float()])


@contextlib.contextmanager
def patched(obj, name: str, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def injected_draw(perm: torch.Tensor, positions: torch.Tensor):
    """torch.randperm -> perm (an image permutation); torch.randint -> positions (interior indices)."""
    calls = []

    def randperm(n, *args, **kwargs):
        assert n == len(perm), f"randperm({n}) but the planned permutation has {len(perm)}"
        calls.append("randperm")
        return perm.clone().to(kwargs.get("device") or "cpu")

    def randint(low, high, size, *args, **kwargs):
        assert tuple(size) == tuple(positions.shape) and low == 0, (low, high, size)
        calls.append("randint")
        return positions.clone().to(kwargs.get("device") or "cpu")

    with patched(torch, "randperm", randperm), patched(torch, "randint", randint):
        yield
    assert calls == ["randperm", "randint"], f"the codebook update drew {calls}"


def _record_codebook(rec: dict, words, ptr, dist_norm, dist_norm_prev) -> None:
    rec["words"].append(words.detach().clone())
    rec["ptr"].append(int(ptr))
    rec["dist_norm"].append(float(dist_norm))
    rec["dist_norm_prev"].append(float(dist_norm_prev))


def _new_record() -> dict:
    return {k: [] for k in (*STEP_SCALARS, "loss", "lr", "wd", "words", "ptr")}


# ---------------------------------------------------------------------------------------------- official
def official_run_args(cfg: Config, official_args) -> argparse.Namespace:
    """main_pretrain.py's args for this config (the fields initialize_optimizer / train_one_epoch read)."""
    args = official_args(cfg)
    args.__dict__.update(
        batch_size=cfg.batch_size, accum_iter=cfg.grad_accum, lr=cfg.lr, blr=cfg.blr, lr_wgen=cfg.lr_wgen,
        weight_decay=cfg.weight_decay, weight_decay_end=cfg.weight_decay_end, no_fp16=True, init_scale=65536.0,
        alpha=cfg.momentum_start, alpha_cos=cfg.momentum_cosine, max_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs, lr_epochs_mul=cfg.lr_epochs_mul, clip_grad=cfg.clip_grad, gpu=None,
        rank=0, log_freq=20)
    args.lr_epochs = int(args.max_epochs * args.lr_epochs_mul)  # main_pretrain.main()'s expression
    return args


def load_into_official(official, state: dict[str, torch.Tensor], official_to_ours) -> None:
    """Copies our-named tensors into the official model; every trainable official tensor must be covered."""
    theirs = official.state_dict()
    covered = set()
    for key, t in theirs.items():
        ours = official_to_ours(key)
        if ours in state:
            if "pos_embed" in key:
                assert torch.allclose(t, state[ours], rtol=0, atol=1e-6), f"{key}: sin-cos position embeddings differ"
            t.copy_(state[ours])
            covered.add(key)
    missing = [n for n, p in official.named_parameters() if p.requires_grad and n not in covered]
    assert not missing, f"official parameters without an initial value: {missing}"


def clip_grad_norm_float64(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2; the clip coefficient in fp32, as torch computes it) with the
    total norm accumulated in float64, as DeepSpeed accumulates ours.

    torch's fp32 norm on the CPU loses up to 1.4e-4 relative on a ViT-B MLP weight gradient (2.4M
    values, measured against float64), which moves the official run's clip coefficient by 4.5e-5 at
    every step of the ViT-B-shaped run: a rounding artefact of the CPU kernel, 150x the fp32 noise of
    everything else. On small tensors (the tiny model) both agree to fp32 rounding. L2 only: a call
    with any other option of torch's fails here rather than being ignored."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    total = torch.linalg.vector_norm(norms).float()
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def run_official(plan: Plan, official_dir: Path, permute: int = 0, clip_norm: str = "float64") -> dict:
    """Trains the official model over the plan; permute=k > 0 shuffles the images of every micro-batch
    (masks and draws follow; k seeds the shuffles): the same function summed in another order, whose
    difference from the unshuffled run is the fp32 noise floor. clip_norm "torch" clips with torch's own
    clip_grad_norm_ (fp32 norm), "float64" with clip_grad_norm_float64."""
    parity = _sibling("parity_official")
    import sys
    sys.path.insert(0, str(official_dir.resolve()))
    import main_pretrain
    import models_moca
    import util.misc as misc

    from moca_fast.io import official_to_ours

    cfg = plan.cfg
    torch.manual_seed(plan.seed)
    official = parity.build_official(models_moca, cfg)
    load_into_official(official, plan.initial, official_to_ours)
    args = official_run_args(cfg, parity.official_args)
    with contextlib.redirect_stdout(io.StringIO()):
        optimizer, loss_scaler, _ = main_pretrain.initialize_optimizer(official, args)
    assert loss_scaler is None

    B = cfg.batch_size
    perms = [torch.randperm(B, generator=torch.Generator().manual_seed(1000 * permute + i)) if permute
             else torch.arange(B) for i in range(len(plan.batches))]
    masks = iter([[m[torch.cat([p, p + B])] for m in ms] for ms, p in zip(plan.masks, perms)])
    rec = _new_record()
    micro = {"terms": [], "momentum": []}

    def forward_hook(module, inputs, kwargs, output):
        loss, stats = output
        micro["terms"].append((float(loss.detach()), stats["losses"]["img"], stats["losses"]["loc"]))
        if kwargs["update_teacher"]:
            micro["momentum"].append(kwargs["momentum"])

    def pre_step(opt, *_):
        rec["lr"].append([g["lr"] for g in opt.param_groups])
        rec["wd"].append([g["weight_decay"] for g in opt.param_groups])

    def post_step(opt, *_):
        terms = torch.tensor(micro["terms"], dtype=torch.float64).mean(0).tolist()
        for k, v in zip(("loss", "loss_img", "loss_loc"), terms):
            rec[k].append(v)
        rec["momentum"].append(micro["momentum"][-1])
        micro["terms"].clear()
        bow = official.bow_extractor.bow_extractor[0]
        _record_codebook(rec, bow._embedding, bow._embedding_ptr, bow._dist_norm, bow._dist_norm_prev)

    clip = clip_grad_norm_float64 if clip_norm == "float64" else torch.nn.utils.clip_grad_norm_

    def clip_and_record(parameters, max_norm, *a, **kw):
        norm = clip(parameters, max_norm, *a, **kw)
        rec["grad_norm"].append(float(norm))
        return norm

    bow = official.bow_extractor.bow_extractor[0]
    update = bow.update
    step_of = {"i": 0}

    def planned_update(x, attn=None):
        view, perm, positions = plan.draws[step_of["i"]]
        # their update receives the chosen view's features; images index the (permuted) batch
        inverse = torch.argsort(perms[step_of["i"] * plan.accum + plan.accum - 1])
        with injected_draw(inverse[perm], positions):
            update(x, attn)
        step_of["i"] += 1

    def planned_random():
        return 0.25 if plan.draws[step_of["i"]][0] == 0 else 0.75

    handles = [official.register_forward_hook(forward_hook, with_kwargs=True),
               optimizer.register_step_pre_hook(pre_step), optimizer.register_step_post_hook(post_step)]
    batches = [(x1[p], x2[p]) for (x1, x2), p in zip(plan.batches, perms)]
    per_epoch = plan.loader_len
    with contextlib.ExitStack() as stack:
        stack.enter_context(parity.cuda_calls_stay_on_cpu())
        stack.enter_context(patched(torch.cuda, "synchronize", lambda *a, **k: None))
        # our process group (gloo, world size 1) exists in this process; theirs runs as undistributed
        stack.enter_context(patched(misc, "is_dist_avail_and_initialized", lambda: False))
        stack.enter_context(patched(misc, "make_two_complementary_masks", lambda *a, **k: (next(masks), list(cfg.len_keep()))))
        stack.enter_context(patched(torch.nn.utils, "clip_grad_norm_", clip_and_record))
        stack.enter_context(patched(bow, "update", planned_update))
        stack.enter_context(patched(models_moca, "random", types.SimpleNamespace(random=planned_random)))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        for epoch in range(math.ceil(len(batches) / per_epoch)):
            loader = EpochLoader(batches[epoch * per_epoch:(epoch + 1) * per_epoch], per_epoch)
            main_pretrain.train_one_epoch(official, loader, optimizer, torch.device("cpu"), epoch, loss_scaler,
                                          log_writer=None, args=args)
    for h in handles:
        h.remove()
    assert step_of["i"] == plan.steps and len(rec["loss"]) == plan.steps

    names = {id(p): official_to_ours(n) for n, p in official.named_parameters()}
    rec["state"] = {official_to_ours(k): v.detach().clone() for k, v in official.state_dict().items()
                    if official_to_ours(k) is not None}
    rec["adam"] = {names[id(p)]: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                   for p, s in optimizer.state.items()}
    return rec


class EpochLoader:
    """The micro-batches of one epoch as train_one_epoch reads a DataLoader: len() is the full epoch
    (its epoch_float divides by it), iteration may stop early (the run's last, partial epoch)."""

    def __init__(self, batches: list, length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (([x1, x2], 0) for x1, x2 in self.batches)


# ---------------------------------------------------------------------------------------------- ours
def run_ours(plan: Plan) -> dict:
    """Trains our model over the plan with the trainer's pieces (needs an initialised process group:
    moca_fast.train.engine.init_distributed)."""
    from moca_fast.model.moca import MOCA
    from moca_fast.train.engine import build_engine, init_distributed
    from moca_fast.train.loop import Trainer
    from moca_fast.train.schedules import Schedules, apply_schedules
    from moca_fast.train.step import LossTotals, train_step

    cfg = plan.cfg
    dist_info = init_distributed()
    model = MOCA(cfg, 1)
    model.load_state_dict(plan.initial, strict=True)
    engine, _ = build_engine(model, cfg, dist_info, "fp32")
    model = engine.module
    schedules = Schedules.from_config(cfg, 1)
    clock = types.SimpleNamespace(step=0, steps_per_epoch=plan.steps_per_epoch, cfg=cfg,
                                  loader=range(plan.loader_len))
    masks = iter(plan.masks)
    model.sample_masks = lambda n, device: [m.to(device) for m in next(masks)]
    views, codebook_step = [], model.codebook.step
    teacher_tokens = model.teacher_tokens

    def record_tokens(x):
        views.append(teacher_tokens(x))
        return views[-1]

    def planned_step(tokens):
        view, perm, positions = plan.draws[clock.step]
        with injected_draw(perm, positions):
            codebook_step(views[-2 + view])

    model.teacher_tokens, model.codebook.step = record_tokens, planned_step
    totals, rec = LossTotals(dist_info.device), _new_record()
    batches = iter(plan.batches)
    groups = {g["name"]: g for g in engine.optimizer.param_groups}
    for step in range(plan.steps):
        clock.step = step
        epoch = Trainer.epoch_float(clock)
        apply_schedules(engine.optimizer.param_groups, schedules, epoch)
        momentum = schedules.momentum(epoch)
        terms = train_step(engine, batches, momentum, torch.float32, totals)
        views.clear()
        for k, v in zip(("loss", "loss_img", "loss_loc"), terms.double().tolist()):
            rec[k].append(v)
        rec["grad_norm"].append(float(engine.get_global_grad_norm()))
        rec["momentum"].append(momentum)
        rec["lr"].append([groups[n]["lr"] for n in GROUPS])
        rec["wd"].append([groups[n]["weight_decay"] for n in GROUPS])
        cb = model.codebook
        _record_codebook(rec, cb.words, cb.ptr, cb.dist_norm, cb.dist_norm_prev)
    rec["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rec["adam"] = adam_state(engine)
    return rec


def adam_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter AdamW exp_avg / exp_avg_sq / step of our engine (ZeRO 1/2 keeps them on flat fp32
    partitions: each parameter's slice is its DeepSpeed hp-fragment address; world size 1: the whole)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no ZeRO: the torch optimizer's own per-parameter state
            state, view = inner.state[p], lambda t: t
        else:
            flat = engine.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
            state, address = inner.state[flat], mapping.get_hp_fragment_address()
            assert address.numel == p.numel(), f"{name}: partitioned over ranks ({address.numel} of {p.numel()})"
            view = lambda t, a=address, shape=p.shape: t.narrow(0, a.start, a.numel).view(shape)
        out[name] = {"exp_avg": view(state["exp_avg"]).detach().clone(),
                     "exp_avg_sq": view(state["exp_avg_sq"]).detach().clone(),
                     "step": torch.as_tensor(state["step"], dtype=torch.float64).clone()}
    return out
