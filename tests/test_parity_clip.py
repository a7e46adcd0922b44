"""The parity harness's float64-norm gradient clipping (scripts/parity_training.clip_grad_norm_float64)
against torch.nn.utils.clip_grad_norm_ and against an exact float64 computation.

Tolerances: on small tensors torch's fp32 norm is exact to a few ulps, so the two must agree to 1e-6
relative; on a 2.4M-value tensor (a ViT-B MLP weight) the float64 norm must match the float64 reference
to fp32 rounding of its result (1e-7 relative), which torch's fp32 CPU norm need not.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from parity_training import clip_grad_norm_float64  # noqa: E402  (scripts/ is not a package)


def _parameters(shapes, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g)
    return params


@pytest.mark.parametrize("shapes", [[(3,)], [(7, 5), (5,)], [(13, 3, 2), (1,), (4, 4)]])
def test_matches_torch_clip_on_small_tensors(shapes):
    ours, theirs = _parameters(shapes, 0), _parameters(shapes, 0)
    norm = clip_grad_norm_float64(ours, 0.1)
    reference = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    torch.testing.assert_close(norm, reference, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_leaves_gradients_below_the_bound_unchanged():
    params = _parameters([(6, 4), (4,)], 1, scale=1e-3)
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_float64(params, 10.0)
    assert float(norm) < 10.0
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


def test_norm_of_a_large_tensor_is_exact():
    params = _parameters([(3072, 768), (768,)], 2)
    exact = torch.cat([p.grad.double().flatten() for p in params]).norm()
    norm = clip_grad_norm_float64(params, 0.1)
    assert abs(float(norm) - float(exact)) / float(exact) <= 1e-7
    clipped = torch.cat([p.grad.double().flatten() for p in params]).norm()
    assert abs(float(clipped) - 0.1) / 0.1 <= 1e-6
