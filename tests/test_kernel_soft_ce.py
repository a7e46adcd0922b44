"""Fused soft-target KL losses (moca_fast.kernels.soft_ce) vs their PyTorch references: values and gradients.

Runs the Triton kernels on the CPU under the interpreter. Fresh random inputs each run (the seed is printed).
Tolerances, as max |fast - ref| <= tol * max |ref| over each output (loss, d_features, d_prototypes):
- fp32: 1e-5. Measured worst 4e-6, at inv_temp 100 or logits ~130, where the fp32 rounding of the logits
  themselves (|logit| * 2^-24, in both implementations) shows in the probabilities.
- bf16 (and fp16) inputs: 1e-2, against the reference evaluated in fp32 on the same 16-bit inputs (words
  rounded to bf16, as 16-bit products do). Expected worst ~4e-3: the logits' gradient enters the gradient GEMMs
  rounded to bf16 (2^-9 relative per element; emulated at K = 4096, D = 512: <= 2.1e-3 of the largest entry),
  plus the gradients' own rounding to bf16.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernel_checks import fresh_seed, rel_err  # noqa: E402
from moca_fast.kernels import INTERPRET_HINT, interpreted, launch  # noqa: E402
from moca_fast.kernels import soft_ce  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
M, K, D = 37, 67, 21  # no dimension a multiple of a block (CPU blocks: rows 16, words 32, teacher channels 16)
B2, L, C, N_DEC = 6, 29, 19, 11  # dense loss: 2B images of L tokens, N_DEC decoded positions each


@pytest.fixture(autouse=True)
def random_inputs_on_the_interpreter():
    fresh_seed()
    assert interpreted(soft_ce._kl_fwd_kernel), INTERPRET_HINT


def student(rows: int, dtype, scale: float = 1.0):
    features = (scale * torch.randn(rows, D)).to(dtype).requires_grad_()
    prototypes = F.normalize(torch.randn(K, D), dim=1).to(dtype).requires_grad_()
    return features, prototypes


def bow_targets(rows: int) -> torch.Tensor:
    """Probability rows with exact zeros (0 log 0) and one all-zero row."""
    target = torch.softmax(3 * torch.randn(rows, K), dim=1) * (torch.rand(rows, K) > 0.2)
    target[1] = 0.0
    return target / target.sum(1, keepdim=True).clamp_min(1e-5)


def teacher(dtype):
    """Teacher tokens as the model passes them (a strided view), decoded positions (a slice of a permutation)."""
    tokens = (2 * torch.randn(B2, L + 1, C)).to(dtype)[:, 1:]
    dec_ids = torch.argsort(torch.rand(B2, L), dim=1)[:, :N_DEC]
    words = F.normalize(torch.randn(K, C).clamp(min=0), dim=1)
    return tokens, dec_ids, words


def run(fn, features, prototypes, *args, upstream: float):
    """Loss and the gradients of upstream * loss with respect to features and prototypes (fp32 copies of
    the inputs go to the reference)."""
    loss = fn(features, prototypes, 3.0, *args)
    (upstream * loss).backward()
    return loss.detach(), features.grad, prototypes.grad


def as_fp32_leaves(features, prototypes):
    return (features.detach().float().requires_grad_(), prototypes.detach().float().requires_grad_())


def assert_matches(fast, ref, tol):
    for name, a, b in zip(("loss", "d_features", "d_prototypes"), fast, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_soft_target_kl_matches_reference(dtype):
    features, prototypes = student(M, dtype)
    target = bow_targets(M)
    upstream = torch.rand(()).item() + 0.5
    fast = run(soft_ce.soft_target_kl, features, prototypes, target, upstream=upstream)
    ref = run(soft_ce.soft_target_kl_reference, *as_fp32_leaves(features, prototypes), target, upstream=upstream)
    assert fast[1].dtype == dtype and fast[2].dtype == dtype
    assert_matches(fast, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inv_temp", [1.0, 100.0])
def test_masked_soft_target_kl_matches_reference(dtype, inv_temp):
    features, prototypes = student(B2 * N_DEC, dtype)
    tokens, dec_ids, words = teacher(dtype)
    inv_temp = torch.tensor([inv_temp])
    upstream = torch.rand(()).item() + 0.5
    fast = run(soft_ce.masked_soft_target_kl, features, prototypes, tokens, dec_ids, words, inv_temp,
               upstream=upstream)
    ref = run(soft_ce.masked_soft_target_kl_reference, *as_fp32_leaves(features, prototypes), tokens, dec_ids,
              words.to(dtype).float(), inv_temp, upstream=upstream)
    assert_matches(fast, ref, TOL[dtype])


def test_autocast_means_bf16_products():
    """fp32 inputs under bf16 autocast: products of bf16-rounded operands (as autocast's matmul), fp32 grads."""
    features, prototypes = student(B2 * N_DEC, torch.float32)
    tokens, dec_ids, words = teacher(torch.float32)
    inv_temp = torch.tensor([20.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run(soft_ce.masked_soft_target_kl, features, prototypes, tokens, dec_ids, words, inv_temp,
                   upstream=1.0)
    bf16 = [t.detach().bfloat16().float() for t in (features, prototypes, tokens, words)]
    ref = run(soft_ce.masked_soft_target_kl_reference, *as_fp32_leaves(*bf16[:2]), bf16[2], dec_ids, bf16[3],
              inv_temp, upstream=1.0)
    assert fast[1].dtype == torch.float32
    assert_matches(fast, ref, TOL[torch.bfloat16])


def test_large_logits_stay_finite():
    """Student logits up to ~130 (exp overflows fp32 beyond 88.7), teacher at inv_temp 100: no overflow."""
    features, prototypes = student(B2 * N_DEC, torch.float32, scale=10.0)
    tokens, dec_ids, words = teacher(torch.float32)
    inv_temp = torch.tensor([100.0])
    fast = run(soft_ce.masked_soft_target_kl, features, prototypes, tokens, dec_ids, words, inv_temp, upstream=1.0)
    ref = run(soft_ce.masked_soft_target_kl_reference, *as_fp32_leaves(features, prototypes), tokens, dec_ids,
              words, inv_temp, upstream=1.0)
    assert_matches(fast, ref, TOL[torch.float32])


@pytest.mark.parametrize("variant", ["dense_target", "teacher_codes"])
def test_every_output_element_written(variant):
    """The row pass from NaN-poisoned buffers: each row's KL and the logits' gradient, against their definitions."""
    rows = 5
    s, a = torch.randn(rows, K), 3 * torch.randn(rows, K)  # f P^T and x W^T of the rows
    a_scale = torch.rand(rows) + 0.5
    if variant == "dense_target":
        target = bow_targets(rows)
        tgt = target
    else:
        target = torch.softmax(a * a_scale[:, None], dim=1)
        tgt = s
    kl, g = torch.full((rows,), float("nan")), torch.full((rows, K), float("nan"))
    launch(soft_ce._kl_fwd_kernel, (rows,), s, a, a_scale, tgt, g, kl, K, 3.0, s.stride(0), a.stride(0),
           tgt.stride(0), g.stride(0), TEACHER=variant == "teacher_codes", WRITE_GRAD=True, BLOCK_K=32)
    logits = 3.0 * s
    assert rel_err(kl, F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(1)) <= 1e-5
    assert rel_err(g, target.sum(1, keepdim=True) * torch.softmax(logits, dim=1) - target) <= 1e-5


def test_custom_op_registration():
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes) of the op."""
    features, prototypes = student(B2 * N_DEC, torch.float32)
    tokens, dec_ids, words = teacher(torch.float32)
    dense = (features, prototypes, 3.0, bow_targets(features.shape[0]), None, None, None, None, torch.float32,
             torch.float32)
    masked = (features, prototypes, 3.0, None, tokens.contiguous(), dec_ids, words, torch.tensor([20.0]),
              torch.float32, torch.float32)
    for args in (dense, masked):
        torch.library.opcheck(soft_ce._kl_fwd_op, args)


def test_compiles_without_graph_break():
    """torch.compile(fullgraph=True) traces through both losses; forward and gradients equal eager."""
    features, prototypes = student(B2 * N_DEC, torch.float32)
    tokens, dec_ids, words = teacher(torch.float32)
    target, inv_temp = bow_targets(features.shape[0]), torch.tensor([20.0])

    def both(f, p, kappa):
        return soft_ce.soft_target_kl(f, p, kappa, target) + soft_ce.masked_soft_target_kl(
            f, p, kappa, tokens, dec_ids, words, inv_temp)

    compiled = run(torch.compile(both, backend="aot_eager", fullgraph=True), features, prototypes, upstream=1.0)
    eager = run(both, *as_fp32_leaves(features, prototypes), upstream=1.0)
    assert_matches(compiled, eager, 1e-6)


@pytest.mark.parametrize("case", ["features_1d", "dims", "target_shape", "dec_ids_rows", "words_shape"])
def test_bad_input_one_line_error(case):
    features, prototypes = student(B2 * N_DEC, torch.float32)
    tokens, dec_ids, words = teacher(torch.float32)
    target, inv_temp = bow_targets(features.shape[0]), torch.tensor([1.0])
    kl, masked = soft_ce.soft_target_kl, soft_ce.masked_soft_target_kl
    fn, args = {"features_1d": (kl, (features[0], prototypes, 3.0, target)),
                "dims": (kl, (features, prototypes[:, 1:], 3.0, target)),
                "target_shape": (kl, (features, prototypes, 3.0, target[:, 1:])),
                "dec_ids_rows": (masked, (features, prototypes, 3.0, tokens, dec_ids[:, 1:], words, inv_temp)),
                "words_shape": (masked, (features, prototypes, 3.0, tokens, dec_ids, words[1:], inv_temp))}[case]
    with pytest.raises(ValueError, match=r"^moca_fast\.kernels\.soft_ce\.\w+: [^\n]+$"):
        fn(*args)
