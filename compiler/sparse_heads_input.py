"""The export rewrite that lets an INT8 SparseLinear read attention's output head by head.

timm's attention multiplies the softmax by v head by head, [batch, heads, tokens, head_dim], then
transposes and reshapes that to [batch, tokens, heads × head_dim] for proj:

    MatMul(attention, v) → Transpose(0, 2, 1, 3) → Reshape → SparseLinear (proj)
becomes
    MatMul(attention, v) → SparseLinear (proj, x_heads = heads)

OpenVINO runs the Transpose as a node of its own, plus a copy before the kernel node; with `x_heads` the
kernels read each row's channels from the heads where they lie (Int8Blocks::x_heads). The rewrite
applies where the node is the only reader of the Reshape, and the Reshape of the Transpose, and every
shape on the way is static.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .quantized_onnx import _attribute, _Graph
from .sparse_onnx import OP_TYPE

HEADS_TO_TOKENS = [0, 2, 1, 3]  # [batch, heads, tokens, head_dim] -> [batch, tokens, heads, head_dim]


def _heads_of(g: _Graph, node: onnx.NodeProto, shapes: dict) -> tuple[onnx.NodeProto, int] | None:
    """(the Transpose that turns attention's heads into tokens, the number of heads) where `node`'s x is
    that Transpose's output reshaped to [batch, tokens, in_features], else None."""
    if _attribute(node, "format") != "int8_1x4" or _attribute(node, "x_heads") \
            or _attribute(node, "heads") or _attribute(node, "norm_epsilon"):
        return None
    reshape = g.produced_by(node.input[0], "Reshape")
    transpose = None if reshape is None else g.produced_by(reshape.input[0], "Transpose")
    if transpose is None or g.consumers.get(node.input[0], []) != [node] \
            or g.consumers.get(transpose.output[0], []) != [reshape] \
            or list(_attribute(transpose, "perm", [])) != HEADS_TO_TOKENS:
        return None
    heads_shape, x_shape = shapes.get(transpose.input[0]), shapes.get(reshape.output[0])
    if heads_shape is None or x_shape is None or len(heads_shape) != 4:
        return None
    batch, heads, tokens, head_dim = heads_shape
    width = heads * head_dim
    if tuple(x_shape) != (batch, tokens, width) or width != _attribute(node, "in_features"):
        return None
    return transpose, heads


def read_heads_input(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Let each INT8 SparseLinear whose x is attention's output transposed and reshaped read it head by
    head (module docstring), in place; `shapes` are the static shapes of the graph before the sparse
    rewrite. The Transpose and Reshape are left for a prune. Returns how many nodes read heads."""
    g = _Graph(model)
    graph_outputs = {output.name for output in g.graph.output}
    rewritten = 0
    for node in list(g.graph.node):
        if node.op_type != OP_TYPE or node.input[0] in graph_outputs:
            continue
        found = _heads_of(g, node, shapes)
        if found is None:
            continue
        transpose, heads = found
        node.input[0] = transpose.input[0]
        node.attribute.append(helper.make_attribute("x_heads", heads))
        rewritten += 1
    return rewritten
