"""The export rewrite that lets an INT8 qkv SparseLinear write attention's q, kᵀ and v itself.

timm's attention reshapes qkv's output to [batch, tokens, 3, heads, head_dim], transposes it to
[3, batch, heads, tokens, head_dim], splits q, k and v, and transposes k again for q · kᵀ. OpenVINO runs
those two transposes as nodes of their own. A SparseLinear node with `heads` writes its output straight
into that layout instead (kᵀ already transposed, see `split_heads`), so both transposes go:

    SparseLinear → Q → DQ → Add(bias) → Reshape → Transpose → Split → Squeeze (k: → Transpose)
becomes
    SparseLinear(heads, int8_output) → DQ → Reshape → Add(bias of q, v) → Split → Squeeze (k: → Reshape)

The node also quantizes its output itself: it writes the int8 codes the QuantizeLinear wrote (the uint8
ones minus 128), so that no float tensor is written and read again between it and attention. The
DequantizeLinear stays in the graph, where OpenVINO needs it to run attention in INT8. Its zero point
becomes int8 (zero point − 128); with the symmetric qkv quantizer that is 0 and the input is left out,
since an explicit zero point makes OpenVINO keep a subtraction inside attention (2.0 → 2.8 ms a block
at batch 16). OpenVINO runs its INT8 passes only on a model that still holds a QuantizeLinear on
activations, so where no other one is left, the first qkv node keeps its own.

k's bias is left out: it adds q · b_k to every score of a query row, a constant per row that the
softmax cancels, so the rewrite only applies where k reaches a softmax over keys through scalings alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .quantized_onnx import _attribute, _bias_of, _Graph
from .sparse_onnx import LINEAR_INPUTS, OP_TYPE, _output_quantizer

KERNEL_ROWS = 16  # output channels the kernels write at a time: a head must hold a whole number of them
SCALINGS = frozenset({"Mul", "Div"})  # by a one-element tensor: between kᵀ and the scores, and after
ADDITIONS = frozenset({"Add", "Sub"})  # of anything (a mask) between the scores and the softmax


@dataclass
class _HeadsMatch:
    """A qkv node's chain up to q, k and v (see the module docstring), with what the rewrite needs."""

    node: onnx.NodeProto
    quantize: onnx.NodeProto
    dequantize: onnx.NodeProto
    out_quantization: tuple[float, int]  # the output quantizer's scale and uint8 zero point
    bias_add: onnx.NodeProto
    bias: np.ndarray  # (3, heads, head_dim)
    reshape: onnx.NodeProto
    transpose: onnx.NodeProto
    split: onnx.NodeProto
    k_transpose: onnx.NodeProto
    shape: tuple[int, ...]  # the Reshape's output: batch, tokens, 3, heads, head_dim


def _is_one_element(g: _Graph, name: str, shapes: dict) -> bool:
    shape = shapes.get(name)
    constant = g.constant(name)
    return (constant is not None and constant.size == 1) or (shape is not None and int(np.prod(shape)) == 1)


def _scales_by_one_number(g: _Graph, op: onnx.NodeProto, operand: str, shapes: dict) -> bool:
    """Whether `op` multiplies `operand` by one number or divides it by one: what keeps a constant per
    query row of the scores constant per row."""
    other = [name for name in op.input if name != operand]
    return op.op_type in SCALINGS and len(other) == 1 and _is_one_element(g, other[0], shapes) \
        and (op.op_type != "Div" or op.input[0] == operand)


def _reaches_softmax_over_keys(g: _Graph, k_transposed: str, shapes: dict) -> bool:
    """Whether kᵀ only goes, through scalings by one number, into a MatMul as its right operand whose
    scores only go, through scalings by one number and additions, into a Softmax over the last axis."""
    end = k_transposed
    while (reader := g.single_reader(end, "MatMul")) is None:
        readers = g.consumers.get(end, [])
        if len(readers) != 1 or not _scales_by_one_number(g, readers[0], end, shapes):
            return False
        end = readers[0].output[0]
    if reader.input[1] != end or reader.input[0] == end:
        return False
    scores = reader.output[0]
    rank = len(shapes.get(scores, ()))
    while True:
        readers = g.consumers.get(scores, [])
        if len(readers) != 1:
            return False
        op = readers[0]
        if op.op_type == "Softmax":
            return rank > 0 and _attribute(op, "axis", -1) in (-1, rank - 1)
        other = [name for name in op.input if name != scores]
        added = op.op_type in ADDITIONS and len(other) == 1  # a mask: the row's constant stays one
        if not (added or _scales_by_one_number(g, op, scores, shapes)) \
                or shapes.get(op.output[0]) != shapes.get(scores):
            return False
        scores = op.output[0]


def _match_heads(g: _Graph, node: onnx.NodeProto, shapes: dict) -> _HeadsMatch | None:
    """The chain from an INT8 SparseLinear without addend, output quantizer or bias of its own to q, k
    and v, where every shape on it is static."""
    if node.op_type != OP_TYPE or _attribute(node, "format") != "int8_1x4" or _attribute(node, "heads") \
            or len(node.input) != LINEAR_INPUTS["int8_1x4"] or _attribute(node, "out_scale") \
            or np.any(g.constant(node.input[-1])):
        return None
    found = _output_quantizer(g, node.output[0])
    bias = None if found is None else _bias_of(g, found[1].output[0])
    reshape = None if bias is None else g.single_reader(bias[0].output[0], "Reshape")
    transpose = None if reshape is None else g.single_reader(reshape.output[0], "Transpose")
    split = None if transpose is None else g.single_reader(transpose.output[0], "Split")
    shape = None if reshape is None else shapes.get(reshape.output[0])
    if split is None or shape is None or len(shape) != 5 or shape[2] != 3 \
            or list(_attribute(transpose, "perm", [])) != [2, 0, 3, 1, 4] \
            or _attribute(split, "axis", 0) != 0 or len(split.output) != 3 \
            or shapes.get(node.input[0]) != (shape[0], shape[1], _attribute(node, "in_features")):
        return None
    rows = g.constant(node.input[1]).size - 1
    if bias[1].size != rows or bias[1].shape[-1:] != (rows,) or shape[3] * shape[4] * 3 != rows \
            or shape[4] % KERNEL_ROWS:
        return None
    squeezes = [g.single_reader(out, "Squeeze") for out in split.output]
    if any(s is None or list(g.constant(s.input[1]) if len(s.input) > 1 else _attribute(s, "axes", [])) != [0]
           for s in squeezes):
        return None
    k_transpose = g.single_reader(squeezes[1].output[0], "Transpose")
    if k_transpose is None or list(_attribute(k_transpose, "perm", [])) != [0, 1, 3, 2] \
            or not _reaches_softmax_over_keys(g, k_transpose.output[0], shapes):
        return None
    return _HeadsMatch(node, found[0], found[1], found[2], bias[0], bias[1].reshape(3, shape[3], shape[4]),
                       reshape, transpose, split, k_transpose, shape)


def _rewrite(g: _Graph, match: _HeadsMatch, quantize_in_node: bool) -> None:
    """The rewrite in the module docstring, in place; the node takes in its output quantizer where
    `quantize_in_node`."""
    batch, tokens, _, heads, head_dim = match.shape
    name = match.node.name
    match.node.attribute.append(helper.make_attribute("heads", heads))
    if quantize_in_node:
        _quantize_in_node(g, match)
    g.set_constant(f"{name}.heads_shape", np.array([3, batch, heads, tokens, head_dim], np.int64))
    match.reshape.input[:] = [match.dequantize.output[0], f"{name}.heads_shape"]
    bias = match.bias.copy()
    bias[1] = 0  # k's: cancelled by the softmax (module docstring)
    g.set_constant(f"{name}.heads_bias", bias.reshape(3, 1, heads, 1, head_dim).astype(np.float32))
    match.bias_add.input[:] = [match.reshape.output[0], f"{name}.heads_bias"]
    match.split.input[0] = match.bias_add.output[0]
    g.set_constant(f"{name}.k_shape", np.array([batch, heads, head_dim, tokens], np.int64))
    k_reshape = helper.make_node("Reshape", [match.k_transpose.input[0], f"{name}.k_shape"],
                                 list(match.k_transpose.output), f"{name}.k_transposed")
    g.graph.node.remove(match.transpose)
    g.graph.node.remove(match.k_transpose)
    g.graph.node.append(k_reshape)
    changed = {match.node.output[0], match.dequantize.output[0], match.reshape.output[0]}
    for info in [i for i in g.graph.value_info if i.name in changed]:
        g.graph.value_info.remove(info)


def _quantize_in_node(g: _Graph, match: _HeadsMatch) -> None:
    """The node writes its output quantizer's codes as int8 and the DequantizeLinear reads them: the
    QuantizeLinear goes (module docstring)."""
    scale, zero_point = match.out_quantization
    name = match.node.name
    match.node.attribute.extend([helper.make_attribute("out_scale", scale),
                                 helper.make_attribute("out_zero_point", zero_point),
                                 helper.make_attribute("int8_output", 1)])
    match.node.output[0] = match.quantize.output[0]
    if zero_point == 128:
        del match.dequantize.input[2]
    else:
        g.set_constant(f"{name}.codes_zero_point", np.array(zero_point - 128, np.int8))
        match.dequantize.input[2] = f"{name}.codes_zero_point"
    g.graph.node.remove(match.quantize)


def _activation_quantizers(g: _Graph) -> int:
    """How many QuantizeLinear nodes the graph has on activations (not on constants)."""
    return sum(n.op_type == "QuantizeLinear" and g.constant(n.input[0]) is None for n in g.graph.node)


def fuse_attention_heads(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Let each INT8 qkv SparseLinear whose chain matches write q, kᵀ and v (module docstring), in place;
    `shapes` are the static shapes of the graph before the sparse rewrite. Returns how many did."""
    g = _Graph(model)
    matches = [m for n in list(g.graph.node) if (m := _match_heads(g, n, shapes)) is not None]
    left = _activation_quantizers(g)
    for match in reversed(matches):  # the first qkv node is the one that may keep its quantizer
        _rewrite(g, match, quantize_in_node=left > 1)  # the last one stays (module docstring)
        left -= 1
    return len(matches)
