"""Small node predicates and walks shared by structure finding, rewriting and counting."""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import PassError

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
PASSTHROUGH_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity)
_TRANSPARENT_TYPES: list[type[nn.Module]] = []  # see register_transparent

ADD_TARGETS = {operator.add, operator.iadd, torch.add}
MUL_TARGETS = {operator.mul, operator.imul, torch.mul}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
RESHAPE_METHODS = {"reshape", "view"}
RESHAPE_FUNCTIONS = {torch.reshape}
SDPA = F.scaled_dot_product_attention


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a `call_module` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    return isinstance(module_of(gm, node), types)


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return is_module(gm, node, nn.Linear)


def is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return is_module(gm, node, NORM_TYPES)


def register_transparent(module_type: type[nn.Module]) -> type[nn.Module]:
    """Let structure finding look through `module_type` as it does through Dropout.

    For modules passes insert in front of a Linear that keep the block's wiring: a per-feature
    gate, a selection of features. Usable as a class decorator.
    """
    if module_type not in _TRANSPARENT_TYPES:
        _TRANSPARENT_TYPES.append(module_type)
    return module_type


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Dropout, Identity and registered transparent modules: one input in, the same wiring out."""
    return is_module(gm, node, (*PASSTHROUGH_TYPES, *_TRANSPARENT_TYPES))


def is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ADD_TARGETS


def is_mul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in MUL_TARGETS


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    )


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is SDPA


def is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "softmax") or (
        node.op == "call_function" and node.target in {torch.softmax, F.softmax}
    )


def is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in RESHAPE_FUNCTIONS
    )


def is_mean(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    )


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of a node that carry data (constant parameters excluded)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def walk(start: fx.Node, step: Callable[[fx.Node], list[fx.Node]], stop: Callable[[fx.Node], bool],
         limit: int = 64) -> fx.Node | None:
    """Breadth-first search from `start` (excluded) along `step` for the first node where `stop` holds."""
    seen, queue = {start}, deque(step(start))
    while queue and len(seen) <= limit:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            return node
        queue.extend(step(node))
    return None


def walk_up(start: fx.Node, stop: Callable[[fx.Node], bool], limit: int = 64) -> fx.Node | None:
    """Nearest data ancestor of `start` for which `stop` holds."""
    return walk(start, tensor_inputs, stop, limit)


def walk_down(start: fx.Node, stop: Callable[[fx.Node], bool], limit: int = 64,
              first_input_only: bool = False) -> fx.Node | None:
    """Nearest descendant of `start` for which `stop` holds; users are visited in graph order, so the
    answer does not depend on the order a copy of the graph happens to list them in. With
    `first_input_only` it follows a tensor only into ops that take it as their first argument (the data
    path), not into side branches that read it (a token score reading the attention output)."""
    position = {node: index for index, node in enumerate(start.graph.nodes)}

    def users(node: fx.Node) -> list[fx.Node]:
        found = [u for u in node.users if not first_input_only or (u.args and u.args[0] is node)]
        return sorted(found, key=position.__getitem__)

    return walk(start, users, stop, limit)


def ancestors(node: fx.Node) -> Iterator[fx.Node]:
    """Every node `node` depends on, parameters included."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        stack.extend(current.all_input_nodes)


def descendants(node: fx.Node) -> Iterator[fx.Node]:
    """Every node that depends on `node`."""
    seen, stack = set(), list(node.users)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        stack.extend(current.users)


def module_call(gm: fx.GraphModule, target: str) -> fx.Node:
    """The node that calls submodule `target`; PassError names it when the graph never calls it."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target), None)
    if node is None:
        raise PassError(f"graph does not call module {target!r}")
    return node


def node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    """Look a node up by name; KeyError names the missing node."""
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"graph has no node named {name!r}")
