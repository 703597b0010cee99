"""vitsparse's sparse-kernel nodes (SparseLinear, SparseMLP) seen as the matrix products they compute.

onnx's shape inference knows nothing of them, so every shape after the first one would be unknown, and
a MAC count would skip them. `matmul_stand_ins` rewrites them, in a shape-only copy, into MatMuls of
the same shapes; `kernel_layers` names those products, says which run in INT8, where each one's packed weight
values are and how many zeros it has; `below_crossover` finds those that dense OpenVINO would run
faster on this CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import helper

from .kernel_crossover import default_min_sparsity
from .sparse_extension import DOMAIN

LINEAR_OP, MLP_OP = "SparseLinear", "SparseMLP"
# SparseMLP's inputs: x, fc1's 5 weight arrays, the activation table, then fc2's; each weight's first
# array holds its row offsets (output channels + 1), its third the values of its non-zero blocks
MLP_FC2_INPUT = 7
VALUES_OFFSET = 2  # from a weight's first array to its values
INT8_FORMAT = "int8_1x4"  # SparseMLP's only format
# packed format -> (the precision its kernel computes in, input channels per block, stored values per
# block: INT8 keeps 4 codes, bf16 one int32 holding both halves, f32 one float)
FORMATS = {INT8_FORMAT: ("int8", 4, 4), "bf16_1x2": ("bf16", 2, 1), "f32_csr": ("f32", 1, 1)}


@dataclass(frozen=True)
class KernelLayer:
    """One product a sparse-kernel node computes: [n, in_features] × [in_features, out_features]."""

    name: str
    op_type: str  # the node's: SparseLinear or SparseMLP
    in_features: int
    out_features: int
    format: str  # the packed weight's (compiler/sparse_onnx.py): int8_1x4, bf16_1x2 or f32_csr
    values: str  # the initializer holding the weight's stored values
    stored_values: int | None = None  # how many the initializer holds (None: not known)

    @property
    def int8(self) -> bool:
        """The kernel computes it in INT8, whatever precision the engine reports for the node."""
        return self.precision == "int8"

    @property
    def precision(self) -> str | None:
        """int8, bf16 or f32: what the kernel computes in (None for a format this module does not know)."""
        return FORMATS[self.format][0] if self.format in FORMATS else None

    @property
    def zero_share(self) -> float | None:
        """The share of all-zero blocks (of 4 input channels in INT8, 2 in bf16, single weights in f32),
        as the export's `sparse_min_sparsity` counts them; None where the format or count is unknown."""
        if self.format not in FORMATS or self.stored_values is None:
            return None
        _, width, per_block = FORMATS[self.format]
        blocks = self.out_features * math.ceil(self.in_features / width)
        return 1.0 - self.stored_values / per_block / blocks


def kernel_layers(graph: onnx.GraphProto) -> dict[str, list[KernelLayer]]:
    """Node name -> the products of each vitsparse node in `graph` (fc1 then fc2 for SparseMLP). A node
    whose shapes cannot be read is left out: the engine that loads it says what is wrong with it."""
    dims = {init.name: tuple(init.dims) for init in graph.initializer}
    dims.update({value.name: tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
                 for value in graph.input})
    found = {}
    for node in graph.node:
        if node.domain == DOMAIN:
            products = _products(node, dims)
            if products:
                found[node.name] = products
    return found


def _products(node: onnx.NodeProto, dims: dict[str, tuple[int, ...]]) -> list[KernelLayer] | None:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def rows(index: int) -> int | None:  # output channels of the weight whose row offsets are input `index`
        shape = dims.get(node.input[index]) if index < len(node.input) else None
        return shape[0] - 1 if shape and len(shape) == 1 and shape[0] > 1 else None

    def values(index: int) -> str:
        return node.input[index + VALUES_OFFSET] if index + VALUES_OFFSET < len(node.input) else ""

    def stored(index: int) -> int | None:
        shape = dims.get(values(index))
        return math.prod(shape) if shape is not None and len(shape) == 1 else None

    in_features, fc1 = attributes.get("in_features"), rows(1)
    if not isinstance(in_features, int) or in_features < 1 or fc1 is None:
        return None
    if node.op_type == MLP_OP:
        fc2 = rows(MLP_FC2_INPUT)
        return None if fc2 is None else [
            KernelLayer(f"{node.name}/fc1", MLP_OP, in_features, fc1, INT8_FORMAT, values(1), stored(1)),
            KernelLayer(f"{node.name}/fc2", MLP_OP, fc1, fc2, INT8_FORMAT, values(MLP_FC2_INPUT),
                        stored(MLP_FC2_INPUT))]
    if node.op_type != LINEAR_OP:
        return None
    form = attributes.get("format")
    form = form.decode() if isinstance(form, bytes) else str(form)
    return [KernelLayer(node.name, LINEAR_OP, in_features, fc1, form, values(1), stored(1))]


def below_crossover(graph: onnx.GraphProto, flags: Iterable[str] | None = None) -> list[KernelLayer]:
    """The products of `graph`'s vitsparse nodes with fewer zeros than the crossover of their precision
    on a CPU with `flags` (None: this one), where OpenVINO's dense MatMul runs faster than the kernel:
    a file exported on a CPU without AMX and run on one with it, or with a low `sparse_min_sparsity`."""
    flags = None if flags is None else tuple(flags)
    return [layer for layers in kernel_layers(graph).values() for layer in layers
            if layer.zero_share is not None and layer.precision is not None
            and layer.zero_share < default_min_sparsity(layer.precision, flags)]


def matmul_stand_ins(graph: onnx.GraphProto) -> None:
    """Replace, in place, each vitsparse node by a chain of MatMuls named after its products, each
    reading a value-less graph input of shape [in_features, out_features]."""
    layers = kernel_layers(graph)
    if not layers:
        return
    nodes = []
    for node in graph.node:
        if node.name not in layers or node.domain != DOMAIN:
            nodes.append(node)
            continue
        current = node.input[0]
        if any(a.name == "x_heads" and a.i for a in node.attribute):  # x head by head: as proj reads it
            nodes.extend(_merged_heads(graph, node.name, current))
            current = nodes[-1].output[0]
        for index, layer in enumerate(layers[node.name]):
            weight = f"{layer.name}/stand_in_weight"
            graph.input.append(helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT,
                                                             [layer.in_features, layer.out_features]))
            last = index == len(layers[node.name]) - 1
            output = node.output[0] if last else f"{layer.name}/stand_in_output"
            nodes.append(helper.make_node("MatMul", [current, weight], [output], layer.name))
            current = output
    del graph.node[:]
    graph.node.extend(nodes)


def _merged_heads(graph: onnx.GraphProto, name: str, x: str) -> list[onnx.NodeProto]:
    """Attention's output x [batch, heads, tokens, head_dim] transposed and reshaped to [batch, tokens,
    heads × head_dim], the stand-in of a node that reads x head by head; the Reshape's target goes into
    `graph` as an initializer."""
    target = f"{name}/stand_in_heads_shape"
    graph.initializer.append(helper.make_tensor(target, onnx.TensorProto.INT64, [3], [0, 0, -1]))
    return [helper.make_node("Transpose", [x], [f"{name}/stand_in_tokens"], f"{name}/stand_in_transpose",
                             perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{name}/stand_in_tokens", target], [f"{name}/stand_in_x"],
                             f"{name}/stand_in_reshape")]
