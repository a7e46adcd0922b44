"""The kernel tests compare the fused path, not the reference with itself: under TRITON_INTERPRET=1 every public
fused op launches its Triton kernels on CPU tensors (counted by moca_fast.kernels.launch), and a kernel that was
compiled for the GPU while TRITON_INTERPRET=1 is set is an error, never a silent switch to the reference."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moca_fast.kernels import LAUNCHES, interpreted, runs_triton  # noqa: E402
from moca_fast.kernels import codebook_assign as ca  # noqa: E402
from moca_fast.kernels import soft_ce  # noqa: E402

K, C, D = 40, 24, 12


def launched(fn, *kernels: str) -> None:
    before = LAUNCHES.copy()
    fn()
    assert all(LAUNCHES[k] > before[k] for k in kernels), f"{kernels} did not run: {LAUNCHES - before}"


def test_every_kernel_is_interpreted():
    kernels = [ca._token_stats_kernel, ca._bow_kernel, soft_ce._kl_fwd_kernel, soft_ce._kl_fwd_tuned]
    assert all(interpreted(k) for k in kernels)


def test_every_public_op_runs_its_triton_kernels():
    tokens = torch.randn(2, 17, C)[:, 1:]
    words = F.normalize(torch.randn(K, C).clamp(min=0), dim=1)
    inv_temp, interior = torch.tensor([20.0]), torch.arange(3, 9)
    launched(lambda: ca.codebook_assign(tokens, words, inv_temp, interior), "_token_stats_kernel", "_bow_kernel")
    f, p = torch.randn(2, C, requires_grad=True), torch.randn(K, C, requires_grad=True)
    launched(lambda: soft_ce.soft_target_kl(f, p, 3.0, torch.softmax(torch.randn(2, K), 1)).backward(),
             "_kl_fwd_kernel")
    dec, p = torch.randn(10, D, requires_grad=True), torch.randn(K, D, requires_grad=True)
    dec_ids = torch.argsort(torch.rand(2, 16), dim=1)[:, :5]
    launched(lambda: soft_ce.masked_soft_target_kl(dec, p, 3.0, tokens, dec_ids, words, inv_temp).backward(),
             "_kl_fwd_kernel")


def test_gpu_compiled_kernel_under_interpret_is_an_error():
    with pytest.raises(RuntimeError, match=r"^moca_fast\.kernels\.soft_ce: TRITON_INTERPRET is set but the kernels "
                                           r"were compiled for the GPU: "):
        runs_triton(object(), torch.device("cpu"), "soft_ce")


def test_without_grad_the_gradients_are_not_computed():
    """Under no_grad (evaluation) the loss runs the same row pass without writing the logits' gradient."""
    f, p = torch.randn(3, C), torch.randn(K, C)
    target = torch.softmax(torch.randn(3, K), 1)
    with torch.no_grad():
        loss = soft_ce.soft_target_kl(f, p, 3.0, target)
        _, d_f, d_p = soft_ce._kl_fwd_op(f, p, 3.0, target, None, None, None, None, torch.float32, torch.float32,
                                         False)
    assert d_f.numel() == 0 and d_p.numel() == 0
    assert abs(loss.item() - soft_ce.soft_target_kl_reference(f, p, 3.0, target).item()) <= 1e-5 * loss.abs().item()
