"""Fused teacher codebook assignment (moca_fast.kernels.codebook_assign) vs its PyTorch reference.

Runs the Triton kernels on the CPU under the interpreter. Fresh random inputs each run (the seed is printed).
Tolerances, as max |fast - ref| <= tol * max |ref| over each output (relative to the output's scale: elementwise
relative error means nothing for probabilities that underflow to 0 at inv_temp 100):
- fp32: 1e-5. Measured worst 3e-6, at inv_temp 100, where the fp32 rounding of the logits themselves (in both
  implementations) becomes the probabilities' relative error.
- bf16 tokens: 1e-2, against the reference on the same bf16 tokens with the words rounded to bf16: 16-bit
  products round both operands (as autocast does to the reference's F.linear); the kernels accumulate in
  fp32, so what remains is fp32 rounding (measured worst 2e-6).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moca_fast.kernels  # noqa: E402
from kernel_checks import fresh_seed, rel_err  # noqa: E402
from moca_fast.kernels import INTERPRET_HINT, interpreted  # noqa: E402
from moca_fast.kernels import codebook_assign as ca  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
N, L, C, K = 3, 37, 45, 67  # no dimension a multiple of a block (CPU blocks: tokens 16, words 32, channels 16)


@pytest.fixture(autouse=True)
def random_inputs_on_the_interpreter():
    fresh_seed()
    assert interpreted(ca._token_stats_kernel), INTERPRET_HINT


def make_inputs(dtype):
    """Teacher tokens as the model passes them (a strided view: [CLS] dropped), a codebook, interior ids."""
    tokens = (3 * torch.randn(N, L + 1, C)).to(dtype)[:, 1:]
    words = F.normalize(torch.randn(K, C).clamp(min=0), dim=1)
    interior = torch.randperm(L)[:23].sort().values
    return tokens, words, interior


def rounded(x, dtype):
    return x.to(dtype).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inv_temp", [1.0, 20.0, 100.0])
def test_matches_reference(dtype, inv_temp):
    tokens, words, interior = make_inputs(dtype)
    inv_temp = torch.tensor([inv_temp])
    bow, stat = ca.codebook_assign(tokens, words, inv_temp, interior)
    ref_bow, ref_stat = ca.codebook_assign_reference(tokens, rounded(words, dtype), inv_temp, interior)
    assert bow.shape == (N, K) and bow.dtype == torch.float32 and stat.shape == ()
    assert torch.isfinite(bow).all() and torch.isfinite(stat)
    assert rel_err(bow, ref_bow) <= TOL[dtype]
    assert rel_err(stat, ref_stat) <= TOL[dtype]
    torch.testing.assert_close(bow.sum(1), torch.ones(N), rtol=0, atol=1e-5)


def test_autocast_means_bf16_products():
    """fp32 tokens under bf16 autocast: products of the bf16-rounded tokens and words, as autocast's F.linear."""
    tokens, words, interior = make_inputs(torch.float32)
    inv_temp = torch.tensor([20.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bow, stat = ca.codebook_assign(tokens, words, inv_temp, interior)
    ref_bow, ref_stat = ca.codebook_assign_reference(rounded(tokens, torch.bfloat16), rounded(words, torch.bfloat16),
                                                     inv_temp, interior)
    assert rel_err(bow, ref_bow) <= TOL[torch.bfloat16] and rel_err(stat, ref_stat) <= TOL[torch.bfloat16]


def test_every_output_element_written():
    """Per-token state and the mean interior codes from NaN-poisoned buffers, each against its definition."""
    tokens, words, interior = make_inputs(torch.float32)
    inv_temp = torch.tensor([37.0])
    lse, gap, rnorm = torch.full((3, N * L), float("nan"))
    bow_mean = torch.full((N, K), float("nan"))
    ca.launch_assign(tokens, words, inv_temp, interior, torch.float32, lse, gap, rnorm, bow_mean)
    norm = tokens.float().norm(dim=2).clamp_min(1e-5)
    cos = torch.einsum("nlc,kc->nlk", tokens.float() / norm[..., None], words)
    codes = torch.softmax(inv_temp * cos, dim=2)
    assert rel_err(lse, torch.logsumexp(inv_temp * cos, dim=2).flatten()) <= 1e-5
    assert rel_err(gap, (cos.max(2).values - cos.mean(2)).flatten()) <= 1e-5
    assert rel_err(rnorm, 1 / norm.flatten()) <= 1e-5
    assert rel_err(bow_mean, codes[:, interior].mean(1)) <= 1e-5


def test_extreme_tokens_and_temperature_stay_finite():
    """Huge, tiny and all-zero tokens (norm below eps) at inv_temp 100: no overflow, same as the reference."""
    tokens, words, interior = make_inputs(torch.float32)
    tokens = tokens.clone()
    tokens[0] *= 1e15
    tokens[1, :5] *= 1e-15
    tokens[1, 5:9] = 0.0
    inv_temp = torch.tensor([100.0])
    bow, stat = ca.codebook_assign(tokens, words, inv_temp, interior)
    ref_bow, ref_stat = ca.codebook_assign_reference(tokens, words, inv_temp, interior)
    assert torch.isfinite(bow).all()
    assert rel_err(bow, ref_bow) <= TOL[torch.float32] and rel_err(stat, ref_stat) <= TOL[torch.float32]


def test_custom_op_registration():
    """Schema, fake (meta) implementation and dispatch of the custom op, as torch.compile needs them."""
    tokens, words, interior = make_inputs(torch.float32)
    torch.library.opcheck(ca._codebook_assign_op, (tokens, words, torch.tensor([5.0]), interior, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break():
    tokens, words, interior = make_inputs(torch.float32)
    inv_temp = torch.tensor([20.0])
    compiled = torch.compile(ca.codebook_assign, backend="aot_eager", fullgraph=True)
    bow, stat = compiled(tokens, words, inv_temp, interior)
    ref_bow, ref_stat = ca.codebook_assign_reference(tokens, words, inv_temp, interior)
    assert rel_err(bow, ref_bow) <= TOL[torch.float32] and rel_err(stat, ref_stat) <= TOL[torch.float32]


def test_cpu_without_interpreter_falls_back_to_reference(caplog, monkeypatch):
    """A kernel compiled for the GPU (not interpreted) on CPU tensors: the reference runs, logged once."""
    monkeypatch.setattr(ca, "_token_stats_kernel", object())
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # not interpreted and not asked for: the logged fallback
    monkeypatch.setattr(moca_fast.kernels, "_fallback_logged", set())
    tokens, words, interior = make_inputs(torch.float32)
    inv_temp = torch.tensor([20.0])
    with caplog.at_level("WARNING", logger="moca_fast.kernels"):
        for _ in range(2):
            bow, stat = ca.codebook_assign(tokens, words, inv_temp, interior)
    ref_bow, ref_stat = ca.codebook_assign_reference(tokens, words, inv_temp, interior)
    assert torch.equal(bow, ref_bow) and torch.equal(stat, ref_stat)
    assert [r.getMessage().count("using the PyTorch reference") for r in caplog.records] == [1]


@pytest.mark.parametrize("case", ["tokens_2d", "channels", "inv_temp", "interior_float", "interior_empty"])
def test_bad_input_one_line_error(case):
    tokens, words, interior = make_inputs(torch.float32)
    inv_temp = torch.tensor([1.0])
    args = {"tokens_2d": (tokens[0], words, inv_temp, interior),
            "channels": (tokens, words[:, 1:], inv_temp, interior),
            "inv_temp": (tokens, words, torch.ones(2), interior),
            "interior_float": (tokens, words, inv_temp, interior.float()),
            "interior_empty": (tokens, words, inv_temp, interior[:0])}[case]
    with pytest.raises(ValueError, match=r"^moca_fast\.kernels\.codebook_assign: [^\n]+$"):
        ca.codebook_assign(*args)
