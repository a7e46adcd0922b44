"""The fast path's start-up self-check (moca_fast.model.selfcheck) on the CPU, under Triton's interpreter:
it passes on the real kernels, and stops with one line naming the op when an op is wrong or does not run."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from moca_fast.config import load_config  # noqa: E402
from moca_fast.kernels import LAUNCHES, codebook_assign, soft_ce  # noqa: E402
from moca_fast.model.selfcheck import SelfCheckError, check_fused_ops  # noqa: E402

CFG = load_config("tiny", overrides=dict(batch_size=1, img_size=32, skip_offset=1))  # interpreter time: rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_passes_on_the_fused_kernels(dtype):
    before = LAUNCHES.copy()
    check_fused_ops(CFG, torch.device("cpu"), dtype)
    assert all(LAUNCHES[k] > before[k] for k in ("_kl_fwd_kernel", "_token_stats_kernel", "_bow_kernel"))


def test_wrong_result_stops_with_one_line_naming_the_op(monkeypatch):
    forward = soft_ce.kl_forward

    def off_by_one_percent(*args):
        loss, d_f, d_p = forward(*args)
        return loss * 1.01, d_f, d_p

    monkeypatch.setattr(soft_ce, "kl_forward", off_by_one_percent)
    with pytest.raises(SelfCheckError, match=r"^impl=fast: start-up check of moca_fast\.kernels\.soft_ce\."
                                             r"soft_target_kl \(image loss\): loss differs from the reference by "
                                             r"1\.0e-02 relative \(> 1e-05, float32\)$"):
        check_fused_ops(CFG, torch.device("cpu"), torch.float32)


def test_kernel_that_does_not_compile_stops_with_one_line(monkeypatch):
    def fails(*args):
        raise RuntimeError("PassManager::run failed\nMLIR reproducer ...")

    monkeypatch.setattr(codebook_assign, "launch_assign", fails)
    with pytest.raises(SelfCheckError, match=r"^impl=fast: start-up check of moca_fast\.kernels\.codebook_assign: "
                                             r"failed to compile or run: RuntimeError: PassManager::run failed$"):
        check_fused_ops(CFG, torch.device("cpu"), torch.float32)
