"""Multiply-accumulate (MAC) and parameter counting per node and in total.

Convention: one MAC is one multiply plus one add. The DeiT paper and timm report MACs under the
name "FLOPs" (DeiT-S: 4.6 G); vitsparse reports them as `macs`. Only the matrix products are
counted (linear layers, convolutions, attention matmuls); norms, softmax and activations are
elementwise and left out, as in those published figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from . import graph_utils as gu
from .shapes import propagate_shapes, shape_of
from .structure import ViTStructure, find_vit_structure

MacCounter = Callable[[fx.GraphModule, fx.Node], int]
_MODULE_COUNTERS: dict[type[nn.Module], MacCounter] = {}
_NODE_COUNTERS: list[tuple[Callable[[fx.Node], bool], MacCounter]] = []


def register_module_counter(module_type: type[nn.Module]) -> Callable[[MacCounter], MacCounter]:
    """Register how to count the MACs of a call to `module_type` (later passes add their modules)."""
    def decorate(fn: MacCounter) -> MacCounter:
        _MODULE_COUNTERS[module_type] = fn
        return fn
    return decorate


def register_node_counter(matches: Callable[[fx.Node], bool]) -> Callable[[MacCounter], MacCounter]:
    """Register a MAC counter for function/method nodes that `matches` accepts."""
    def decorate(fn: MacCounter) -> MacCounter:
        _NODE_COUNTERS.append((matches, fn))
        return fn
    return decorate


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape else 0


@register_module_counter(nn.Linear)
def _linear_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    return _numel(shape_of(node)) * gm.get_submodule(node.target).in_features


@register_module_counter(nn.Conv2d)
def _conv_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    conv = gm.get_submodule(node.target)
    per_output = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return _numel(shape_of(node)) * per_output


@register_node_counter(gu.is_matmul)
def _matmul_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    left = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return _numel(shape_of(node)) * (left[-1] if left else 0)


@register_node_counter(gu.is_sdpa)
def _sdpa_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    query, key, value = (shape_of(a) for a in node.args[:3])
    if not (query and key and value):
        return 0
    *batch, q_len, qk_dim = query
    kv_len, v_dim = key[-2], value[-1]
    return math.prod(batch) * q_len * kv_len * (qk_dim + v_dim)


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """MACs of one node for the batch its shapes were propagated with (0 if not a matrix product)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        counter = next((fn for t, fn in _MODULE_COUNTERS.items() if isinstance(module, t)), None)
        return counter(gm, node) if counter else 0
    counter = next((fn for matches, fn in _NODE_COUNTERS if matches(node)), None)
    return counter(gm, node) if counter else 0


@dataclass(frozen=True)
class CostReport:
    """MACs for one image (per node and total) and parameter counts of a graph."""

    macs: int
    params: int
    nonzero_params: int
    per_node: dict[str, int]

    def as_dict(self) -> dict[str, int]:
        return {"macs": self.macs, "params": self.params, "nonzero_params": self.nonzero_params}


def count_params(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), each shared tensor counted once."""
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in unique), sum(int(p.count_nonzero()) for p in unique)


def count_costs(gm: fx.GraphModule) -> CostReport:
    """Count MACs per image by propagating a batch of one, and the graph's parameters."""
    propagate_shapes(gm, batch_size=1)
    per_node = {n.name: m for n in gm.graph.nodes if (m := node_macs(gm, n))}
    params, nonzero = count_params(gm)
    return CostReport(macs=sum(per_node.values()), params=params, nonzero_params=nonzero, per_node=per_node)


def attention_macs(gm: fx.GraphModule, structure: ViTStructure | None = None,
                   costs: CostReport | None = None) -> int:
    """MACs per image of every block's attention: qkv, the attention matmuls and proj (what head-channel
    pruning budgets against). Structure and costs are found when not given."""
    costs = costs if costs is not None else count_costs(gm)
    structure = structure if structure is not None else find_vit_structure(gm)
    total = 0
    for block in structure.blocks:
        qkv, proj = gu.module_call(gm, block.attn.qkv), gu.module_call(gm, block.attn.proj)
        inside = set(gu.descendants(qkv)) & set(gu.ancestors(proj))
        total += sum(costs.per_node.get(n.name, 0) for n in (qkv, proj, *inside))
    return total
