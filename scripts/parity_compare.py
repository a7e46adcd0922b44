"""Multi-step training parity: comparing two training records (parity_training.py runs them), the bounds
ours must meet, the command's report and the golden file of tests/test_parity_training_golden.py."""
from __future__ import annotations

from pathlib import Path

import torch

from parity_training import GROUPS, STEP_SCALARS, Plan, inputs_checksum, make_plan, run_official, run_ours


# ---------------------------------------------------------------------------------------------- compare
def relative_difference(ours, theirs) -> float:
    """max|ours - theirs| / max|theirs| (0 when both are 0)."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = float((ours - theirs).abs().max())
    return diff / float(theirs.abs().max()) if diff else 0.0


def compare_steps(ours: dict, theirs: dict) -> dict[str, list[float]]:
    """Per-step relative differences of every recorded step quantity (ptr: 0 equal, 1 different)."""
    out = {k: [relative_difference(a, b) for a, b in zip(ours[k], theirs[k])] for k in STEP_SCALARS}
    for k in ("lr", "wd"):
        for i, group in enumerate(GROUPS):
            out[f"{k}[{group}]"] = [relative_difference(a[i], b[i]) for a, b in zip(ours[k], theirs[k])]
    out["words"] = [relative_difference(a, b) for a, b in zip(ours["words"], theirs["words"])]
    out["ptr"] = [float(a != b) for a, b in zip(ours["ptr"], theirs["ptr"])]
    return out


def compare_final(ours: dict, theirs: dict) -> dict[str, tuple[float, str]]:
    """Worst relative difference (and which tensor) per category of the final state and AdamW state."""
    missing = set(theirs["state"]) ^ (set(ours["state"]) - {"kappa"})  # κ: a fixed buffer of ours only
    assert not missing, f"state entries on one side only: {sorted(missing)}"
    assert set(ours["adam"]) == set(theirs["adam"]), "AdamW states of different parameters"
    cats: dict[str, list[tuple[float, str]]] = {"student": [], "teacher": [], "codebook": [], "batchnorm stats": [],
                                                "exp_avg": [], "exp_avg_sq": [], "adam step": []}
    for name, t in theirs["state"].items():
        if not t.is_floating_point():
            d = float(not torch.equal(ours["state"][name], t))
        else:
            d = relative_difference(ours["state"][name], t)
        cat = ("teacher" if name.startswith("teacher.") else "codebook" if name.startswith("codebook.")
               else "batchnorm stats" if "running_" in name or "num_batches" in name else "student")
        cats[cat].append((d, name))
    for name, s in theirs["adam"].items():
        for k, cat in (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("step", "adam step")):
            cats[cat].append((relative_difference(ours["adam"][name][k], s[k]), name))
    return {cat: max(v) for cat, v in cats.items()}


# ---------------------------------------------------------------------------------------------- bounds
#: ours may differ from the official run by at most NOISE_FACTOR x the official code's own difference
#: under a permuted batch (the same function, fp32 sums in another order), and never less than FLOOR
#: (a few fp32 ulps); host-side schedule values (lr, wd, momentum) must agree to double rounding and
#: the codebook pointer and AdamW step exactly.
NOISE_FACTOR = 10.0
FLOOR = 1e-6
EXACT = ("momentum", "ptr", "adam step")


def bounded(ours: dict[str, float], noise: dict[str, float]) -> list[tuple[str, float, float, float, bool]]:
    """(quantity, ours, noise, bound, ok) rows."""
    rows = []
    for k, d in ours.items():
        exact = k in EXACT or k.startswith(("lr[", "wd["))
        bound = 1e-12 if exact else max(NOISE_FACTOR * noise[k], FLOOR)
        rows.append((k, d, noise[k], bound, d <= bound))
    return rows


def summary(ours: dict, theirs: dict) -> dict[str, float]:
    """Max over steps per step quantity and worst tensor per final category: one figure per quantity."""
    out = {k: max(v) for k, v in compare_steps(ours, theirs).items()}
    out.update({k: v[0] for k, v in compare_final(ours, theirs).items()})
    return out


def max_noise(noise_runs: list[dict], theirs: dict) -> dict[str, float]:
    figures = [summary(n, theirs) for n in noise_runs]
    return {k: max(f[k] for f in figures) for k in figures[0]}


def step_table(plan: Plan, ours: dict, theirs: dict) -> str:
    """One line per optimiser step: schedule values and the relative differences of ours vs theirs."""
    d = compare_steps(ours, theirs)
    cols = ("loss", "loss_img", "loss_loc", "grad_norm", "dist_norm", "words")
    lines = [f"{'step':>4} {'lr':>9} {'m':>7} {'|g|':>6} " + " ".join(f"{c:>9}" for c in cols) + "  lr/wd/m/ptr"]
    for i in range(plan.steps):
        sched = max(max(d[k][i] for k in d if k.startswith(("lr[", "wd["))), d["momentum"][i], d["ptr"][i])
        lines.append(f"{i:>4} {theirs['lr'][i][1]:>9.2e} {theirs['momentum'][i]:>7.4f} {theirs['grad_norm'][i]:>6.2f} "
                     + " ".join(f"{d[c][i]:>9.1e}" for c in cols) + f"  {'equal' if sched == 0 else sched}")
    return "\n".join(lines)


def run_setup(setup: str, steps: int, accum: int, official_dir: Path, steps_per_epoch: int, noise_runs: int,
              clip_norm: str = "float64", seed: int = 0) -> tuple[Plan, dict, dict, list[dict]]:
    """(plan, ours, theirs, [official permuted runs])."""
    plan = make_plan(setup, steps, accum, seed, steps_per_epoch)
    theirs = run_official(plan, official_dir, clip_norm=clip_norm)
    noise = [run_official(plan, official_dir, permute=k + 1, clip_norm=clip_norm) for k in range(noise_runs)]
    return plan, run_ours(plan), theirs, noise


def main(opts) -> int:
    from moca_fast.train.engine import init_distributed

    init_distributed()
    failed = []
    for setup in opts.setup:
        for accum in opts.accum:
            plan, ours, theirs, noise = run_setup(setup, opts.steps, accum, opts.official_dir,
                                                  opts.steps_per_epoch, opts.noise_runs, opts.official_clip_norm)
            cfg = plan.cfg
            print(f"\n== {setup} (embed {cfg.embed_dim}, depth {cfg.depth}, {cfg.img_size}px, K={cfg.num_words}), "
                  f"batch {cfg.batch_size} x accum {accum}, {plan.steps} steps, warm-up ends at step "
                  f"{int(cfg.warmup_epochs * plan.steps_per_epoch)}, official grad norm in "
                  f"{opts.official_clip_norm}; relative differences ours vs official ==")
            print(step_table(plan, ours, theirs))
            print(f"{'quantity':<22} {'ours':>9} {'self-noise':>10} {'bound':>9}")
            for k, d, n, bound, ok in bounded(summary(ours, theirs), max_noise(noise, theirs)):
                print(f"{k:<22} {d:>9.2e} {n:>10.2e} {bound:>9.1e}  {'ok' if ok else 'FAIL'}")
                if not ok:
                    failed.append(f"{setup}/accum{accum}/{k}")
            if opts.write_golden and setup == "tiny":
                path = write_golden(opts.write_golden, plan, theirs, noise)
                print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    print(f"\ntraining parity {'FAILED: ' + ', '.join(failed) if failed else 'ok'} "
          f"(bound: max({NOISE_FACTOR:g} x self-noise, {FLOOR:g}); schedules and counters exact)")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- golden
GOLDEN_NAME = "tiny_training_accum{accum}.pt"
#: final tensors stored whole in the golden file (the rest as signatures)
GOLDEN_FULL = ("encoder.cls_token", "encoder.norm.weight", "decoder.mask_token", "img_generator.mlp.1.running_mean",
               "teacher.blocks.0.attn.proj.weight", "codebook.words")


def signature(t: torch.Tensor) -> torch.Tensor:
    """[projection on a fixed N(0, 1) vector, L2 norm] in float64: a projection moves by about the L2 norm
    of any change, so |Δprojection| / norm is an L2-relative difference of the whole tensor."""
    t = t.detach().double().flatten()
    r = torch.randn(t.numel(), generator=torch.Generator().manual_seed(t.numel()), dtype=torch.float64)
    return torch.stack([t @ r, t.norm()])


def golden_form(rec: dict) -> dict:
    """A record reduced to what the golden file keeps (tens of kB for the tiny model)."""
    return {**{k: torch.tensor(rec[k], dtype=torch.float64) for k in (*STEP_SCALARS, "lr", "wd")},
            "ptr": torch.tensor(rec["ptr"]), "words": torch.stack([signature(w) for w in rec["words"]]),
            "state_names": (names := sorted(k for k, v in rec["state"].items() if v.is_floating_point() and k != "kappa")),
            "state": torch.stack([signature(rec["state"][k]) for k in names]),
            "full": {k: rec["state"][k].clone() for k in GOLDEN_FULL}, "adam_names": (params := sorted(rec["adam"])),
            "adam": torch.stack([torch.cat([signature(rec["adam"][k]["exp_avg"]), signature(rec["adam"][k]["exp_avg_sq"]),
                                            rec["adam"][k]["step"].double()[None]]) for k in params])}


def _signature_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(max((a[0] - b[0]).abs(), (a[1] - b[1]).abs()) / b[1].clamp_min(1e-30))


def golden_differences(ours: dict, golden: dict) -> dict[str, float]:
    """Worst relative difference per quantity between two golden forms (ptr / adam step: 0 or 1)."""
    out = {k: max(relative_difference(a, b) for a, b in zip(ours[k], golden[k])) for k in (*STEP_SCALARS, "lr", "wd")}
    out["ptr"] = float(not torch.equal(ours["ptr"], golden["ptr"]))
    out["words"] = max(_signature_difference(a, b) for a, b in zip(ours["words"], golden["words"]))
    assert ours["state_names"] == golden["state_names"] and ours["adam_names"] == golden["adam_names"]
    names = golden["state_names"]
    for cat, pick in (("teacher", lambda k: k.startswith("teacher.")), ("codebook", lambda k: k.startswith("codebook.")),
                      ("batchnorm stats", lambda k: "running_" in k),
                      ("student", lambda k: not k.startswith(("teacher.", "codebook.")) and "running_" not in k)):
        out[cat] = max(_signature_difference(ours["state"][i], golden["state"][i]) for i, k in enumerate(names) if pick(k))
    out["full tensors"] = max(relative_difference(ours["full"][k], g) for k, g in golden["full"].items())
    out["exp_avg"] = max(_signature_difference(o[:2], g[:2]) for o, g in zip(ours["adam"], golden["adam"]))
    out["exp_avg_sq"] = max(_signature_difference(o[2:4], g[2:4]) for o, g in zip(ours["adam"], golden["adam"]))
    out["adam step"] = float(not torch.equal(ours["adam"][:, 4], golden["adam"][:, 4]))
    return out


def write_golden(directory: Path, plan: Plan, theirs: dict, noise: list[dict]) -> Path:
    golden = golden_form(theirs)
    figures = [golden_differences(golden_form(n), golden) for n in noise]
    golden.update(steps_run=plan.steps, accum=plan.accum, steps_per_epoch=plan.steps_per_epoch, seed=plan.seed,
                  checksum=inputs_checksum(plan),
                  self_noise={k: max(f[k] for f in figures) for k in figures[0]})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / GOLDEN_NAME.format(accum=plan.accum)
    torch.save(golden, path)
    return path
