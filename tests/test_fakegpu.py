"""moca_fast.fakegpu: the caching-allocator model, CUDA's autocast policy on CPU tensors, the memory tracker (its
categories, host reads, the CUDA kernels' own allocations, FLOPs) and the inductor stand-in. Expected values
are derived by hand from the rules each docstring states."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moca_fast import kernels
from moca_fast.fakegpu import (CachingAllocatorModel, GpuKernels, HostSyncError, cuda_autocast_policy, fake_cuda,
                               fake_gpu, round_size)
from moca_fast.fakegpu.compiled import compile_like_inductor
from moca_fast.model.vit import Block

MIB = 1 << 20


# ---------------------------------------------------------------------------------------------- allocator
def test_block_sizes_round_up_to_512_bytes():
    assert [round_size(n) for n in (1, 511, 512, 513, 4000)] == [512, 512, 512, 1024, 4096]


def test_small_requests_share_a_2_mib_segment():
    a = CachingAllocatorModel()
    a.malloc(1000), a.malloc(1000)
    assert (a.allocated, a.reserved, a.segments) == (2048, 2 * MIB, 1)


def test_segment_sizes_of_large_requests():
    a = CachingAllocatorModel()
    a.malloc(5 * MIB)  # 1-10 MiB: a 20 MiB segment, split
    assert (a.allocated, a.reserved) == (5 * MIB, 20 * MIB)
    a.malloc(11 * MIB + 1)  # fits the 15 MiB left in that segment
    assert (a.allocated, a.reserved) == (16 * MIB + 512, 20 * MIB)
    b = CachingAllocatorModel()
    b.malloc(11 * MIB + 1)  # >= 10 MiB: its own segment, rounded up to 2 MiB; the 1 MiB - 512 left is not split
    assert (b.allocated, b.reserved) == (12 * MIB, 12 * MIB)


def test_a_cached_block_is_split_only_when_more_than_1_mib_is_left():
    a = CachingAllocatorModel()
    a.free(a.malloc(12 * MIB))
    a.free(a.malloc(11 * MIB + MIB // 2))  # 0.5 MiB left: not split, the whole 12 MiB block is charged
    assert a.peak_allocated == 12 * MIB and a.segments == 1
    a.reset_peak()
    block = a.malloc(10 * MIB)  # 2 MiB left: split
    assert block.size == 10 * MIB and a.allocated == 10 * MIB and a.segments == 1


def test_freed_neighbours_merge_and_best_fit_reuses_them():
    a = CachingAllocatorModel()
    first, second = a.malloc(5 * MIB), a.malloc(5 * MIB)  # one 20 MiB segment
    a.free(first), a.free(second)
    a.malloc(20 * MIB)  # the merged 20 MiB block: no new segment
    assert (a.segments, a.reserved, a.allocated) == (1, 20 * MIB, 20 * MIB)


# ---------------------------------------------------------------------------------------------- autocast
def test_cpu_autocast_casts_as_cuda_autocast_inside_the_policy():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(8, 8, requires_grad=True)
    ln = torch.nn.LayerNorm(8)
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        # CUDA: LayerNorm, softmax, log_softmax and sum in fp32; products in bf16; cat as is (promotion)
        assert ln(x).dtype == torch.softmax(x, 1).dtype == F.log_softmax(x, 1).dtype == x.sum().dtype == torch.float32
        assert F.linear(x.float(), w).dtype == torch.bfloat16
        assert torch.cat([x, x.float()]).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU's own policy again after it
        assert ln(x).dtype == torch.softmax(x, 1).dtype == torch.bfloat16


def test_weight_casts_are_cached_until_autocast_exits():
    from moca_fast.fakegpu import autocast as policy

    x, w = torch.randn(4, 8), torch.randn(8, 8, requires_grad=True)
    with cuda_autocast_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(x, w), F.linear(x, w)
            assert len(policy._CAST_CACHE) == 1  # one bf16 copy of w, reused (x: not a leaf with a gradient)
        assert not policy._CAST_CACHE


def test_fake_cuda_keeps_cuda_autocast_on():
    with fake_cuda(), torch.autocast("cuda", dtype=torch.bfloat16):
        x, w = torch.randn(4, 8, device="cuda"), torch.randn(8, 8, device="cuda")
        assert F.linear(x, w).dtype == torch.bfloat16 and F.linear(x, w).device.type == "cuda"


# ---------------------------------------------------------------------------------------------- tracker
def test_storages_are_allocated_freed_and_categorised():
    with fake_gpu() as memory:
        w = torch.empty(1000, requires_grad=True)  # 4000 bytes: a 4096-byte block
        memory.track(w, "parameters")
        x = torch.empty(1000)
        assert memory.allocator.allocated == 2 * 4096
        with memory.saved_as_activations():
            y = x * w  # saves x (and w, a parameter, which stays one)
        del x
        assert memory.current["activations", "-/empty"] == 4096, "x lives on as a saved activation"
        memory.track_gradients([w])
        y.sum().backward()
        assert memory.current["gradients", "-/mul"] == 4096
        del y
        assert memory.peak == 4 * 4096 + 2 * 512  # w, x, y, w.grad; the loss and its unit gradient
        assert sum(memory.breakdown().values()) == memory.peak


def test_a_host_read_raises_or_gets_a_placeholder():
    with fake_gpu() as memory:
        with pytest.raises(HostSyncError, match="read on the host"):
            torch.ones(3).sum().item()
        assert len(memory.host_syncs) == 1
    with fake_gpu(host_values="placeholder") as memory:
        assert torch.tensor(3.0).item() == 3.0  # a value FakeTensorMode knows
        assert torch.randn(3).sum().item() == 0.0 and not bool(torch.randn(3).sum() > 0)
        assert len(memory.host_syncs) == 3


def test_cublas_workspaces_one_for_the_forward_one_for_the_backward():
    with fake_gpu() as memory:
        a, b = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8)
        (a @ b @ b).sum().backward()
        assert memory.current["workspace", "cuBLAS"] == 2 * GpuKernels.CUBLAS_WORKSPACE


def test_flash_attention_output_has_the_gpu_layout_and_its_backward_scratch():
    """The attention output's transpose + reshape is a view (as on CUDA, where FlashAttention writes [B, N, H, D]);
    the backward allocates FlashAttention-2's dq_accum and softmax_d for the duration of the call."""
    B, H, N, D = 2, 4, 100, 64

    class NoScratch(GpuKernels):
        @staticmethod
        def scratch(func, args):
            return []

    peaks = []
    for gpu in (GpuKernels(), NoScratch()):
        with fake_gpu(gpu=gpu) as memory:
            q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            out = F.scaled_dot_product_attention(q, k, v)
            merged = out.transpose(1, 2).reshape(B, N, H * D)
            assert merged.untyped_storage()._cdata == out.untyped_storage()._cdata
            merged.float().sum().backward()
            peaks.append(memory.peak)
    dq_accum, softmax_d = B * 128 * H * 64 * 4, B * H * 128 * 4  # N and D rounded up to 128 and 32
    assert peaks[0] - peaks[1] == dq_accum + softmax_d


def test_flops_of_products_and_attention():
    with fake_gpu() as memory:
        torch.randn(64, 32) @ torch.randn(32, 16)
        assert memory.flops == 2 * 64 * 32 * 16
        memory.flops = 0
        q = torch.randn(2, 4, 10, 8)
        F.scaled_dot_product_attention(q, q, q)
        assert memory.flops == 4 * 2 * 4 * 10 * 10 * 8  # QK^T and PV


def test_an_op_with_an_unknown_cuda_autocast_rule_is_refused(monkeypatch):
    from moca_fast.fakegpu import autocast as policy

    monkeypatch.setattr(policy, "_LOWER", tuple(name for name in policy._LOWER if name != "mm"))
    assert "mm" in policy.unlisted_cuda_ops()
    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(NotImplementedError, match="aten::mm has a CUDA autocast rule"):
            torch.randn(4, 4).mm(torch.randn(4, 4))
        torch.randn(4, 4).relu()  # no CUDA autocast rule: as is


def test_the_fused_kernels_see_a_gpu_without_running():
    device = torch.device("cpu")
    launches = sum(kernels.LAUNCHES.values())
    with kernels.emulating_gpu():
        assert kernels.on_gpu(device) and kernels.chunk_rows(4096, device) == 4096
        kernels.launch(None, (1,))  # skipped: no kernel is run (None would fail)
    assert not kernels.on_gpu(device) and sum(kernels.LAUNCHES.values()) == launches


# ---------------------------------------------------------------------------------------------- inductor stand-in
def _saved_activations(budget: float) -> tuple[int, torch.Size]:
    with fake_gpu() as memory:
        block = Block(32, 2, 4.0, 1e-6)
        compile_like_inductor([block], memory, budget)
        x = torch.randn(4, 17, 32, requires_grad=True)
        with memory.saved_as_activations():
            y = block(x)
        saved = sum(size for (category, _), size in memory.current.items() if category == "activations")
        y.sum().backward()
        assert x.grad.shape == x.shape
        return saved, y.shape


def test_inductor_stand_in_saves_less_under_a_lower_activation_memory_budget():
    """As inductor partitions a block (tests/test_fastpath.py measures the compiled one): at 0.8 the LayerNorm and
    GELU outputs are recomputed, so at most 80 % of what is saved at 1.0 is kept."""
    (full, shape), (budget, _) = _saved_activations(1.0), _saved_activations(0.8)
    assert shape == (4, 17, 32)
    assert 0 < budget <= 0.8 * full, (budget, full)
