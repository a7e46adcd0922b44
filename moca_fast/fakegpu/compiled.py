"""A stand-in for torch.compile with inductor on fake tensors: what a compiled module saves and allocates.

`compile_like_inductor(module, memory, budget)` replaces module.forward. For each input signature (shapes,
dtypes, grad mode, autocast) it traces the module with AOTAutograd as inductor does (inductor's decompositions,
the min-cut partitioner with compiler="inductor", torch._functorch's activation_memory_budget), so the tensors
the partitioned forward saves for the backward are the ones inductor's would save. The forward and backward
graphs then run eagerly on the fake tensors, with the values inductor would not write to memory counted as
free: a node's output is written when it is a graph output, an extern kernel (matrix product, attention,
custom op) or an input of one, or a reduction (its output smaller than its input); other (pointwise) values
are taken to be fused into their consumers. Not modelled: inductor's joint-graph pattern passes before the
partition and its in-place buffer reuse (the latter only lowers the transient peak inside a block).
"""
from __future__ import annotations

import functools

import torch
import torch.fx

from moca_fast.fakegpu.tracker import MemoryTracker


def _is_view(node: torch.fx.Node) -> bool:
    target = node.target
    schema = getattr(target, "_schema", None)
    return schema is not None and not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)


def _storage_owner(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and _is_view(node) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _numel(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() if isinstance(value, torch.Tensor) else 0


def written_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The call nodes whose values inductor writes to device memory (module docstring)."""
    written = set()
    for node in graph.nodes:
        if node.op == "output":
            written.update(_storage_owner(n) for n in node.all_input_nodes)
        if node.op != "call_function" or _is_view(node):
            continue
        namespace = getattr(node.target, "namespace", "aten")
        extern = namespace not in ("aten", "prims") or torch.Tag.needs_fixed_stride_order in getattr(
            node.target, "tags", ()) or getattr(node.target, "_overloadpacket", None) in _EXTERN
        if extern:
            written.add(node)
            written.update(_storage_owner(n) for n in node.all_input_nodes)
        inputs = [_numel(n) for n in node.all_input_nodes]
        if inputs and _numel(node) < max(inputs):
            written.add(node)
    return written


_aten = torch.ops.aten
_EXTERN = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.convolution, _aten.convolution_backward}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"):
    if hasattr(_aten, _name):
        _EXTERN.add(getattr(_aten, _name))


class _FusedInterpreter(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, memory: MemoryTracker):
        super().__init__(module)
        self.memory = memory
        self.written = written_nodes(module.graph)

    def run_node(self, node):
        if node.op == "call_function" and node not in self.written:
            with self.memory.fused():
                return super().run_node(node)
        return super().run_node(node)


def _executor(memory: MemoryTracker):
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(graph_module: torch.fx.GraphModule, example_inputs):
        def run(*args):
            return _FusedInterpreter(graph_module, memory).run(*args)

        return make_boxed_func(run)

    return compiler


def compile_like_inductor(modules: list[torch.nn.Module], memory: MemoryTracker,
                          activation_memory_budget: float = 1.0) -> None:
    """Replaces the forward of each module (tensor inputs) by the inductor stand-in (module docstring). Modules of
    one class share their traced graphs, as torch.compile's regional compilation shares its compiled code."""
    import torch._functorch.config as functorch_config
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    compiled: dict = {}

    def stand_in(module: torch.nn.Module):
        names = [name for name, _ in module.named_parameters()]
        forward = module.forward

        def functional(*flat):
            return _call_with_parameters(module, forward, dict(zip(names, flat[:len(names)])), flat[len(names):])

        def run(*inputs):
            params = [p for _, p in module.named_parameters()]
            key = (type(module),) + tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in params + list(inputs)) \
                + (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            fn = compiled.get(key)
            if fn is None:
                fn = aot_function(functional, fw_compiler=_executor(memory), bw_compiler=_executor(memory),
                                  partition_fn=functools.partial(min_cut_rematerialization_partition,
                                                                 compiler="inductor"),
                                  decompositions=select_decomp_table())
                with memory.paused(), functorch_config.patch(activation_memory_budget=activation_memory_budget):
                    fn(*[t.detach().clone().requires_grad_(t.requires_grad) for t in params + list(inputs)])
                compiled[key] = fn
            return fn(*params, *inputs)

        return run

    for module in modules:
        module.forward = stand_in(module)


def _call_with_parameters(module, forward, params: dict, inputs):
    """forward(*inputs) with the module's parameters replaced by `params` (the traced graph's inputs)."""
    originals = {}
    for name, value in params.items():
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        originals[name] = sub._parameters[attr]
        sub._parameters[attr] = value
    try:
        return forward(*inputs)
    finally:
        for name, value in originals.items():
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._parameters[attr] = value
