"""CUDA's autocast policy for CPU tensors, so that a fake CPU run casts exactly where a CUDA run would.

The two devices' policies differ where memory matters: under CUDA autocast, layer_norm, softmax, log_softmax,
kl_div, sum and the norms run in fp32 (a 16-bit input is widened first, and LayerNorm saves that fp32 copy for
its backward); CPU autocast leaves them alone, and instead casts ops that CUDA does not (cat, stack, ...). While
`cuda_autocast_policy()` is active, the AutocastCPU kernels of the ops in either policy are replaced by Python
kernels that apply CUDA's rule, with CUDA's weight-cast cache (16-bit copies of fp32 leaf tensors that require
a gradient live until the outermost autocast region exits). The op lists are those of ATen's
`autocast_mode.h` for CUDA (torch 2.11, plus rms_norm); `unlisted_cuda_ops()` names any op this torch casts on
CUDA that the lists miss, and such an op raises NotImplementedError when it runs under autocast here.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch.utils._pytree import tree_map

_LOWER = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "cudnn_convolution",
    "cudnn_convolution_transpose", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "rms_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
_FP32_SET_DTYPE = ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
                   "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
                   "sum.dim_IntList")
_FP32_APPEND_DTYPE = ("norm.Scalar", "norm.ScalarOpt_dim")
_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
            "tensordot", "scatter_add")
#: CUDA ops with their own autocast logic, not a cast policy: cuDNN's RNN (never run by MOCA), and
#: binary_cross_entropy, which CUDA autocast refuses (it raises; use the with_logits form)
_SPECIAL = ("_cudnn_rnn", "binary_cross_entropy")

_CAST_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _ops_with_kernel(key: str) -> set[str]:
    return {name.removeprefix("aten::") for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)}


def _policy() -> dict[str, str]:
    table = {}
    for names, rule in ((_LOWER, "lower"), (_FP32, "fp32"), (_FP32_SET_DTYPE, "fp32_set_dtype"),
                        (_FP32_APPEND_DTYPE, "fp32_append_dtype"), (_PROMOTE, "promote")):
        table.update(dict.fromkeys(names, rule))
    return table


def unlisted_cuda_ops() -> set[str]:
    """Ops this torch casts under CUDA autocast that the emulated policy does not know."""
    return _ops_with_kernel("AutocastCUDA") - set(_policy()) - set(_SPECIAL)


def _overload(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(t, dtype: torch.dtype):
    """ATen's cached_cast: the weight cache holds 16-bit copies of fp32 leaves that require a gradient."""
    if not _eligible(t) or t.dtype == dtype:
        return t
    cacheable = (dtype != torch.float32 and t.dtype == torch.float32 and t.requires_grad and t.is_leaf
                 and not t._is_view() and torch.is_autocast_cache_enabled())
    if not cacheable:
        return t.to(dtype)
    hit = _CAST_CACHE.get(id(t))
    if hit is None or hit[0] is not t:
        hit = _CAST_CACHE[id(t)] = (t, t.to(dtype))
    return hit[1]


def _kernel(op, rule: str):
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    dtype_arg = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

    def cast_all(dtype, args, kwargs):
        return tree_map(lambda t: _cast(t, dtype), (args, kwargs))

    def run(*args, **kwargs):
        if rule == "unknown":
            raise NotImplementedError(f"{op.name()} has a CUDA autocast rule that moca_fast.fakegpu.autocast lacks")
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            if rule == "passthrough":
                return op(*args, **kwargs)
            if rule in ("lower", "fp32"):
                dtype = torch.get_autocast_dtype("cpu") if rule == "lower" else torch.float32
                args, kwargs = cast_all(dtype, args, kwargs)
                return op(*args, **kwargs)
            if rule == "promote":
                dtypes = [t.dtype for t in torch.utils._pytree.tree_leaves((args, kwargs)) if _eligible(t)]
                widest = functools.reduce(torch.promote_types, dtypes, torch.get_autocast_dtype("cpu"))
                args, kwargs = cast_all(widest, args, kwargs)
                return op(*args, **kwargs)
            if rule == "fp32_append_dtype":
                return op(*args, **kwargs, dtype=torch.float32) if _eligible(args[0]) else op(*args, **kwargs)
            # fp32_set_dtype: an explicit dtype wins; else fp32 when the first argument is eligible
            given = kwargs.get("dtype", args[dtype_arg] if dtype_arg is not None and len(args) > dtype_arg else None)
            if given is None and _eligible(args[0]):
                if dtype_arg is not None and len(args) > dtype_arg:
                    args = args[:dtype_arg] + (torch.float32,) + args[dtype_arg + 1:]
                else:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return run


@contextlib.contextmanager
def cuda_autocast_policy():
    """Within: torch.autocast("cpu", dtype) casts as torch.autocast("cuda", dtype) would."""
    policy = _policy()
    unknown = unlisted_cuda_ops()
    cpu_only = _ops_with_kernel("AutocastCPU") - set(policy) - unknown
    library = torch.library.Library("aten", "IMPL")
    original_clear = torch.clear_autocast_cache

    def clear_cache():
        _CAST_CACHE.clear()
        original_clear()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            rules = list(policy.items()) + [(name, "passthrough") for name in sorted(cpu_only)] \
                + [(name, "unknown") for name in sorted(unknown)]
            for name, rule in rules:
                try:
                    op = _overload(name)
                except AttributeError:  # in the lists, not in this torch
                    continue
                library.impl(name, _kernel(op, rule), "AutocastCPU")
        torch.clear_autocast_cache = clear_cache
        yield
    finally:
        torch.clear_autocast_cache = original_clear
        _CAST_CACHE.clear()
        library._destroy()
