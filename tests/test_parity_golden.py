"""Parity with the official implementation, without its code: golden values it produced.

tests/golden/ was written by `python scripts/parity_official.py <valeoai/MOCA checkout> --write-golden tests/golden`:
an official-format checkpoint of a trained-for-3-steps tiny model, and the official model's L_img, L_loc,
teacher codes / bag-of-words, dist_norm after the step and some student gradients for seeded inputs and
the stored masks (training mode, momentum 1.0, update_teacher=False). We load the checkpoint with
load_official, run our reference path on the same inputs and compare: 1e-5 relative (fp32).
"""
import importlib.util
from pathlib import Path

import torch

from moca_fast.io import load_official

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TOLERANCE = 1e-5  # relative, max|ours - official| / max|official|


def _parity_script():
    spec = importlib.util.spec_from_file_location("parity_official", ROOT / "scripts" / "parity_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_path_matches_official_golden_values():
    parity = _parity_script()
    golden = torch.load(GOLDEN / parity.GOLDEN_OUTPUTS, weights_only=True)
    model = load_official(GOLDEN / parity.GOLDEN_CHECKPOINT, parity.PRESET)
    x1, x2, masks = parity.parity_inputs(model.config, golden["seed"], golden["batch"])
    assert torch.equal(torch.stack([x1.sum(), x2.sum()]), golden["inputs_sum"]), "seeded inputs changed (torch RNG?)"
    assert all(torch.equal(m, g) for m, g in zip(masks, golden["masks"]))

    ours = parity.run_ours(model, x1, x2, golden["masks"])

    diffs = {k: parity.relative_difference(ours[k], golden[k])
             for k in ("loss_img", "loss_loc", "loss", "codes", "bow", "dist_norm")}
    diffs.update({f"grad {n}": parity.relative_difference(ours["grads"][n], g) for n, g in golden["grads"].items()})
    assert len(golden["grads"]) == len(parity.GOLDEN_GRADS)
    failed = {k: d for k, d in diffs.items() if d > TOLERANCE}
    assert not failed, f"differs from the official implementation beyond {TOLERANCE:g} relative: {failed}"
