"""The whole model: impl="fast" (fused Triton kernels, CPU interpreter) vs impl="reference" (pure PyTorch).

Same weights, inputs, masks and random draws (the codebook update), fresh random values each run (the seed is
printed), fp32. Tolerance 1e-5, as max |fast - ref| <= 1e-5 * max |ref| for the loss, each loss part, each
parameter gradient and each buffer after the step (dist_norm and the codebook take the fast statistic / draws);
measured worst ~1e-6.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors

import torch  # noqa: E402

from kernel_checks import rel_err  # noqa: E402
from moca_fast.kernels import INTERPRET_HINT, interpreted  # noqa: E402
from moca_fast.kernels.soft_ce import _kl_fwd_kernel  # noqa: E402
from moca_fast.model.moca import build_model  # noqa: E402

TOL = 1e-5


def test_fast_path_matches_reference_path():
    assert interpreted(_kl_fwd_kernel), INTERPRET_HINT
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    torch.manual_seed(seed)
    reference = build_model("tiny", impl="reference")
    fast = build_model("tiny", impl="fast")
    fast.load_state_dict(reference.state_dict())
    cfg = reference.config
    x1, x2 = (torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size) for _ in range(2))
    masks = reference.sample_masks(2 * cfg.batch_size, x1.device)

    results = {}
    for name, model in (("reference", reference), ("fast", fast)):
        torch.manual_seed(seed + 1)  # the same codebook draws in both: words (torch) and view (Python's random)
        random.seed(seed + 1)
        loss, parts = model(x1, x2, 0.99, masks=masks)
        loss.backward()
        results[name] = (loss.detach(), parts)

    (ref_loss, ref_parts), (fast_loss, fast_parts) = results["reference"], results["fast"]
    assert torch.isfinite(fast_loss)
    assert rel_err(fast_loss, ref_loss) <= TOL
    for part in ("img", "loc"):
        assert rel_err(fast_parts[part], ref_parts[part]) <= TOL, part
    ref_params, fast_params = dict(reference.named_parameters()), dict(fast.named_parameters())
    with_grad = [name for name, p in ref_params.items() if p.grad is not None]
    assert any(name.startswith("dense_generator.") for name in with_grad)  # the dense loss's kernel gradients
    assert any(name.startswith("img_generator.") for name in with_grad)
    for name, p in ref_params.items():
        q = fast_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert rel_err(q.grad, p.grad) <= TOL, f"{name}: {rel_err(q.grad, p.grad):.2e}"
    fast_buffers = dict(fast.named_buffers())
    for name, b in reference.named_buffers():
        assert rel_err(fast_buffers[name].float(), b.float()) <= TOL, name


def test_kernel_benchmark_smoke(tmp_path):
    """`python -m bench kernels --small`: runs on the CPU (interpreter), checks fused vs eager, writes its JSON."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "kernels", "--small", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {case for case, r in report["check"].items() if r["ok"]} == {"assign+dense", "dense_loss",
                                                                      "teacher_assign", "image_loss"}
    assert len(report["rows"]) == 7
    for row in report["rows"]:
        for variant in ("eager", "fused"):
            assert row[variant]["status"] == "ok" and row[variant]["ms"] > 0, (row["case"], row["mode"], variant)
        assert row["compiled"]["status"].startswith("skipped: ")  # with its reason
    assert proc.stdout.rstrip().splitlines()[-9].startswith("case ")  # the table is printed last
