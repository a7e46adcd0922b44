"""The fused ops' fp32 products are IEEE fp32 whatever process-wide precision the user set, through either API
(legacy `allow_tf32` / `set_float32_matmul_precision`, or torch >= 2.9's `fp32_precision`), without mixing the
APIs (which raises), writing the setting only when it allows reduced precision, once per op call (not per chunk),
and restoring it as it was. CUDA paths run on fake CUDA tensors (no GPU needed: the setting is read at each
product); CPU paths run the Triton interpreter, eager and under torch.compile."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import moca_fast.kernels as kernels  # noqa: E402
from moca_fast.kernels import codebook_assign as ca  # noqa: E402
from moca_fast.kernels import mm_f32, recording, soft_ce  # noqa: E402

#: the new API's settings a test may change (all "none", i.e. IEEE fp32, in a fresh process)
SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.mkldnn.matmul, torch.backends.mkldnn,
            torch.backends)


@pytest.fixture(autouse=True)
def default_precision():
    assert [s.fp32_precision for s in SETTINGS] == ["none"] * len(SETTINGS), "a test left a precision set"
    yield
    torch.set_float32_matmul_precision("highest")  # the legacy setting's default, then every new one unset
    for s in SETTINGS:
        s.fp32_precision = "none"


@pytest.fixture
def writes(monkeypatch):
    """Every write of an fp32 precision setting (backend, op, value), through the torch._C setter both APIs'
    Python properties call."""
    seen = []
    setter = torch._C._set_fp32_precision_setter

    def counting(backend, op, value):
        seen.append((backend, op, value))
        return setter(backend, op, value)

    monkeypatch.setattr(torch._C, "_set_fp32_precision_setter", counting)
    return seen


class _Products(TorchDispatchMode):
    """Records (device, operand dtype, effective precision setting) at each matrix product dispatched."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.matmul):
            a = args[0]
            setting = torch.backends.cuda.matmul if a.device.type == "cuda" else torch.backends.mkldnn.matmul
            self.seen.append((a.device.type, a.dtype, setting.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def products(monkeypatch):
    """The (device, operand dtype, effective precision setting) at each product the fused ops take in mm_f32."""
    seen = []

    def recorded(a, b):
        with _Products(seen):
            return mm_f32(a, b)

    for module in (soft_ce, ca):
        monkeypatch.setattr(module, "mm_f32", recorded)
    return seen


def _loss_inputs(device, m=32, k=48, d=32, c=24, n=8, images=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    f, p = torch.randn(m, d, generator=g), torch.randn(k, d, generator=g)
    target = torch.softmax(torch.randn(m, k, generator=g), dim=1)
    tokens, words = torch.randn(images, 16, c, generator=g), torch.randn(k, c, generator=g)
    dec_ids = torch.randint(0, 16, (images, n), generator=g)
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for t in (f, p, target, tokens, words, dec_ids)]


def _fused_op_bodies(device, dtype):
    """The two ops' bodies once each (soft_ce: image and dense loss; codebook_assign), launches recorded, not run:
    what a CUDA run computes around its kernels, on fake CUDA tensors."""
    f, p, target, tokens, words, dec_ids = _loss_inputs(device, dtype=dtype)
    inv_temp = torch.full((1,), 10.0, device=device)
    interior = torch.arange(4, 12, device=device)
    with recording():
        soft_ce.kl_forward(f, p, 3.0, target, None, None, None, None, dtype, dtype, True)
        soft_ce.kl_forward(f, p, 3.0, None, tokens, dec_ids, words, inv_temp, dtype, dtype, True)
        state = torch.empty(3, tokens.shape[0] * tokens.shape[1], device=device)
        ca.launch_assign(tokens, words, inv_temp, interior, dtype, *state,
                         torch.empty(tokens.shape[0], words.shape[0], device=device))


def test_new_api_set_first_then_the_cuda_path_runs_ieee_and_leaves_the_setting(products, writes):
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API first, as a user of torch >= 2.9 would
    writes.clear()
    with FakeTensorMode():
        a, b = torch.randn(32, 16, device="cuda"), torch.randn(16, 8, device="cuda")
        assert mm_f32(a, b).dtype == torch.float32
        _fused_op_bodies("cuda", torch.float32)
    assert products and {setting for *_, setting in products} == {"ieee"}, products
    assert writes == [("cuda", "matmul", "ieee"), ("cuda", "matmul", "tf32")] * 4, "mm_f32 + 3 op calls: 2 each"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_tensor_core_products_never_touch_the_setting(products, writes):
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    writes.clear()
    with FakeTensorMode():
        _fused_op_bodies("cuda", torch.bfloat16)
    assert {dtype for _, dtype, _ in products} == {torch.bfloat16, torch.float16}  # fp16: the gradient GEMMs
    assert {setting for *_, setting in products} == {"tf32"}
    assert writes == []


def test_default_precision_is_read_never_written(products, writes):
    with FakeTensorMode():
        _fused_op_bodies("cuda", torch.float32)
    _fused_op_bodies("cpu", torch.float32)
    assert {setting for *_, setting in products} == {"none"} and writes == []


@pytest.mark.parametrize("legacy", ["allow_tf32", "set_float32_matmul_precision"])
def test_legacy_api_setting_is_scoped_without_mixing_the_apis(products, legacy):
    if legacy == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("high")
    with FakeTensorMode():
        _fused_op_bodies("cuda", torch.float32)
    assert {setting for *_, setting in products} == {"ieee"}
    assert torch.backends.cuda.matmul.allow_tf32 is True, "legacy and new settings agree again (reading would raise)"
    assert torch.get_float32_matmul_precision() == "high"


def test_an_inherited_setting_is_restored_unset(products):
    torch.backends.fp32_precision = "tf32"  # every backend and op inherits it
    with FakeTensorMode():
        _fused_op_bodies("cuda", torch.float32)
    assert {setting for *_, setting in products} == {"ieee"}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    torch.backends.fp32_precision = "none"
    assert torch.backends.cuda.matmul.fp32_precision == "none", "still inherited, not pinned to tf32"


def test_before_torch_2_9_the_legacy_flag_is_scoped(monkeypatch):
    monkeypatch.setattr(kernels, "_FP32_PRECISION_API", False)
    torch.backends.cuda.matmul.allow_tf32 = True
    seen = []
    with FakeTensorMode():
        with kernels.ieee_fp32_matmul("cuda"):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32 is True


def test_cpu_fused_ops_take_ieee_products_under_bf16_precision_and_torch_compile(products, writes):
    """mkldnn's bf16 setting would round the CPU's fp32 products: the interpreted ops, compiled with
    fullgraph=True, still take IEEE products (the custom ops' bodies run eagerly inside the graph), write the
    setting twice per op call though each spans several row chunks, and give the eager default-precision result."""
    f, p, target, tokens, words, dec_ids = _loss_inputs("cpu")
    inv_temp = torch.full((1,), 10.0)

    def losses(f, p):
        return (soft_ce.soft_target_kl(f, p, 3.0, target),
                soft_ce.masked_soft_target_kl(f, p, 3.0, tokens, dec_ids, words, inv_temp),
                ca.codebook_assign(tokens, words, inv_temp, torch.arange(4, 12))[0])

    expected = losses(f, p)
    products.clear()
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)
    compiled(f, p)  # compiles (dynamo saves and restores the settings around tracing)
    products.clear()
    writes.clear()
    got = compiled(f, p)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    chunks = f.shape[0] // kernels.chunk_rows(words.shape[0], f.device)
    assert chunks > 1 and len(products) >= 3 * chunks
    assert {setting for *_, setting in products} == {"ieee"}
    assert writes == [("mkldnn", "matmul", "ieee"), ("mkldnn", "matmul", "bf16")] * 3, "3 ops: 2 writes each"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
