"""Reusable graph and parameter rewrites that structured passes are built from.

Every helper edits the GraphModule in place and keeps dtype, device and requires_grad of the
tensors it replaces. Index arguments are the positions to *keep*, in the order to keep them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import graph_utils as gu
from .errors import PassError
from .structure import CoupledParam

Indices = Sequence[int] | torch.Tensor


def as_index(keep: Indices, size: int, what: str) -> torch.Tensor:
    """`keep` as a long tensor of distinct positions in [0, size); PassError names `what` otherwise."""
    index = torch.as_tensor(keep, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise PassError(f"{what}: refusing to remove every channel (keep at least one)")
    if int(index.min()) < 0 or int(index.max()) >= size:
        low, high = int(index.min()), int(index.max())
        raise PassError(f"{what}: indices must lie in [0, {size}), got values in [{low}, {high}]")
    if index.unique().numel() != index.numel():
        raise PassError(f"{what}: indices to keep contain duplicates")
    return index


def _sliced(param: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    data = param.detach().index_select(dim, index.to(param.device)).clone()
    return nn.Parameter(data, requires_grad=param.requires_grad)


def replace_module(gm: fx.GraphModule, target: str, new_module: nn.Module) -> None:
    """Install `new_module` at the qualified name `target` (the graph keeps calling it by name)."""
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, new_module)


def _sliced_weight_and_bias(old: nn.Linear | nn.Conv2d, target: str, out_keep: Indices | None,
                            in_keep: Indices | None) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Weight rows/columns (dims 0/1) and bias entries kept by a Linear or Conv2d slice."""
    weight, bias = old.weight, old.bias
    if out_keep is not None:
        out_index = as_index(out_keep, weight.shape[0], f"{target} outputs")
        weight = _sliced(weight, 0, out_index)
        bias = _sliced(bias, 0, out_index) if bias is not None else None
    if in_keep is not None:
        weight = _sliced(weight, 1, as_index(in_keep, weight.shape[1], f"{target} inputs"))
    return weight, bias


def _install(gm: fx.GraphModule, target: str, old: nn.Module, new: nn.Module, weight: nn.Parameter,
             bias: nn.Parameter | None) -> None:
    new.weight, new.bias = weight, bias
    new.train(old.training)
    replace_module(gm, target, new)


def slice_linear(gm: fx.GraphModule, target: str, *, in_keep: Indices | None = None,
                 out_keep: Indices | None = None) -> nn.Linear:
    """Replace Linear `target` by one holding only the kept input columns and output rows."""
    old = gm.get_submodule(target)
    if not isinstance(old, nn.Linear):
        raise PassError(f"{target!r} is a {type(old).__name__}, not a Linear")
    weight, bias = _sliced_weight_and_bias(old, target, out_keep, in_keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    _install(gm, target, old, new, weight, bias)
    return new


def slice_conv2d(gm: fx.GraphModule, target: str, *, out_keep: Indices | None = None,
                 in_keep: Indices | None = None) -> nn.Conv2d:
    """Slice the output (and input) channels of an ungrouped Conv2d."""
    old = gm.get_submodule(target)
    if not isinstance(old, nn.Conv2d) or old.groups != 1:
        raise PassError(f"{target!r}: expected an ungrouped Conv2d, found {type(old).__name__}")
    weight, bias = _sliced_weight_and_bias(old, target, out_keep, in_keep)
    new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding,
                    old.dilation, bias=bias is not None, padding_mode=old.padding_mode, device="meta")
    _install(gm, target, old, new, weight, bias)
    return new


def slice_norm(gm: fx.GraphModule, target: str, keep: Indices) -> nn.Module:
    """Keep only the given features of a LayerNorm/RMSNorm (its normalized_shape shrinks with them)."""
    norm = gm.get_submodule(target)
    shape = getattr(norm, "normalized_shape", None)
    if shape is None or len(shape) != 1:
        raise PassError(f"{target!r}: expected a norm over the last dimension, found {type(norm).__name__}")
    index = as_index(keep, shape[0], f"{target} features")
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if param is not None:
            setattr(norm, name, _sliced(param, 0, index))
    norm.normalized_shape = (index.numel(),)
    return norm


def slice_parameter(gm: fx.GraphModule, qualname: str, dim: int, keep: Indices) -> nn.Parameter:
    """Slice a free-standing parameter (class token, position embedding, layer scale) along `dim`."""
    owner_name, _, attr = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    param = getattr(owner, attr, None)
    if not isinstance(param, torch.Tensor):
        raise PassError(f"graph has no parameter {qualname!r}")
    new = _sliced(param, dim, as_index(keep, param.shape[dim], qualname))
    setattr(owner, attr, new)
    return new


def slice_coupled(gm: fx.GraphModule, group: Iterable[CoupledParam], keep: Indices) -> None:
    """Slice every tensor of a coupling group to the same kept indices, whatever owns it."""
    by_owner: dict[str, list[CoupledParam]] = {}
    for item in group:
        by_owner.setdefault(item.name.rpartition(".")[0], []).append(item)
    for owner_name, items in by_owner.items():
        owner = gm.get_submodule(owner_name) if owner_name else gm
        dims = {c.dim for c in items if c.name.endswith(".weight")}
        if isinstance(owner, nn.Linear):
            slice_linear(gm, owner_name, out_keep=keep if 0 in dims else None,
                         in_keep=keep if 1 in dims else None)
        elif isinstance(owner, nn.Conv2d):
            slice_conv2d(gm, owner_name, out_keep=keep if 0 in dims else None,
                         in_keep=keep if 1 in dims else None)
        elif hasattr(owner, "normalized_shape"):
            slice_norm(gm, owner_name, keep)
        else:
            for item in items:
                slice_parameter(gm, item.name, item.dim, keep)


def set_reshape_dims(gm: fx.GraphModule, node_name: str, dims: dict[int, int]) -> fx.Node:
    """Replace constant target sizes of a reshape/view node: {position in the shape: new size}."""
    node = gu.node_by_name(gm, node_name)
    if not gu.is_reshape(node):
        raise PassError(f"node {node_name!r} is {node.op} {node.target}, not a reshape/view")
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    shape = list(node.args[1] if packed else node.args[1:])
    for position, size in dims.items():
        if isinstance(shape[position], fx.Node):
            raise PassError(f"{node_name}: dimension {position} is computed at run time, not a constant")
        shape[position] = int(size)
    node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)
    return node


def insert_module_after(gm: fx.GraphModule, node: fx.Node, target: str, module: nn.Module) -> fx.Node:
    """Add `module` under the name `target` and route every user of `node` through it."""
    if target in dict(gm.named_modules()):
        raise PassError(f"a module named {target!r} already exists")
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new_node, delete_user_cb=lambda user: user is not new_node)
    return new_node


def insert_module_before(gm: fx.GraphModule, consumer: fx.Node, target: str, module: nn.Module) -> fx.Node:
    """Add `module` under the name `target` on the first input of `consumer` only (other users of
    that input keep reading it unchanged)."""
    if target in dict(gm.named_modules()):
        raise PassError(f"a module named {target!r} already exists")
    source = consumer.args[0]
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(consumer):
        new_node = gm.graph.call_module(target, (source,))
    consumer.replace_input_with(source, new_node)
    return new_node


@gu.register_transparent
class SelectFeatures(nn.Module):
    """Keep the given features of the last dimension (exports as Transpose, Gather, Transpose).

    Sits between a norm whose statistics need every feature and a Linear that reads only some.
    """

    def __init__(self, index: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gather whole rows of the transposed tensor: CPU engines copy contiguous rows far faster than
        # they pick scattered elements along the innermost axis
        return x.transpose(-1, -2).index_select(-2, self.index).transpose(-1, -2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, keep={self.index.numel()}"

    def as_matmul(self) -> nn.Module:
        """The same selection as a product with a constant one-hot matrix (for engines without Gather)."""
        return SelectByMatmul(self.index, self.in_features)

    def as_last_axis_gather(self) -> nn.Module:
        """The same selection as one Gather along the last axis (OpenVINO runs it without the two
        transposes, which cost it more than the gather itself)."""
        return SelectLastAxis(self.index)


class SelectLastAxis(nn.Module):
    """x[..., index]: a selection of features written as one Gather on the innermost axis."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)


class SelectByMatmul(nn.Module):
    """x @ S with S one-hot (in_features, kept): a selection of features written as a MatMul."""

    def __init__(self, index: torch.Tensor, in_features: int) -> None:
        super().__init__()
        selector = torch.zeros(in_features, index.numel(), device=index.device)
        selector[index, torch.arange(index.numel(), device=index.device)] = 1.0
        self.register_buffer("selector", selector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.selector


def select_input_features(gm: fx.GraphModule, linear: str, keep: Indices) -> nn.Linear:
    """Make Linear `linear` read only the kept input features: slice its columns and gather its input.

    When its input is already a SelectFeatures the two selections compose into one.
    """
    node = gu.module_call(gm, linear)
    in_features = gm.get_submodule(linear).in_features
    index = as_index(keep, in_features, f"{linear} inputs")
    new = slice_linear(gm, linear, in_keep=index)
    source = node.args[0]
    existing = gu.module_of(gm, source) if isinstance(source, fx.Node) else None
    if isinstance(existing, SelectFeatures):
        existing.index = existing.index[index.to(existing.index.device)]
    else:
        selection = SelectFeatures(index.to(new.weight.device), in_features)
        insert_module_before(gm, node, f"{linear.replace('.', '_')}_select", selection)
    return new
