"""ONNX rewrites for INT8: tidy a QDQ export, and turn QDQ into the operator format DeepSparse runs.

`torch.onnx.export` writes a fake-quantized layer as QuantizeLinear → DequantizeLinear on the input
and on the float weight (then a Transpose for MatMul). `fold_weight_quantizers` stores each weight as
INT8 codes already transposed, which is the QDQ form ONNX Runtime fuses into integer kernels.
`to_operator_format` replaces every MatMul/Gemm/Conv that reads two dequantized operands by
MatMulInteger/ConvInteger → Cast → Mul (per-channel rescale, the input and weight scales folded
into one constant) → Add (the float bias): the integer form DeepSparse accelerates. SparseML adds
the bias in INT32 before the Cast; a float bias keeps the result within float rounding of the QDQ
model's, where an INT32 bias moved digits-vit's logits by 0.02 through the next layers' rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import CompilerError


class QuantizedOnnxError(CompilerError):
    """An ONNX graph that the INT8 rewrites cannot handle."""


class _Graph:
    """Producers, consumers and initializers of an ONNX graph, for pattern matching on nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.graph = model, model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return numpy_helper.to_array(init) if init is not None else None

    def single_reader(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node reading `name`, when it is the only one and of `op_type`."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def set_constant(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(value, name)
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]

    def prune(self) -> None:
        """Drop nodes nothing reads (graph outputs are read) and initializers no node reads."""
        needed = {out.name for out in self.graph.output}
        kept: list[onnx.NodeProto] = []
        for node in reversed(list(self.graph.node)):
            if any(out in needed for out in node.output):
                kept.append(node)
                needed.update(node.input)
        del self.graph.node[:]
        self.graph.node.extend(reversed(kept))
        unused = [init for init in self.graph.initializer if init.name not in needed]
        for init in unused:
            self.graph.initializer.remove(init)


def _attribute(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value (strings decoded), or `default`."""
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on a constant: round half to even, saturate to the zero point's type."""
    shape = [1] * values.ndim
    if scale.ndim == 1:
        shape[axis] = scale.size
    info = np.iinfo(zero_point.dtype)
    codes = np.rint(values / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int64)
    return np.clip(codes, info.min, info.max).astype(zero_point.dtype)


def fold_weight_quantizers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace QuantizeLinear on constant weights by their INT8 codes, and fold a following Transpose
    into the codes (moving the per-channel axis with it); Constant nodes and constants passed through
Identity become initializers. Returns the rewritten model (in place)."""
    g = _Graph(model)
    for node in list(g.graph.node):  # zero points come as Constant nodes, shared ones through Identity
        if node.op_type == "Constant" and _attribute(node, "value") is not None:
            g.set_constant(node.output[0], numpy_helper.to_array(_attribute(node, "value")))
            g.graph.node.remove(node)
        elif node.op_type == "Identity" and node.input[0] in g.initializers:
            g.set_constant(node.output[0], g.constant(node.input[0]))
            g.graph.node.remove(node)
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in g.initializers:
            continue
        scale, zero_point = g.constant(node.input[1]), g.constant(node.input[2])
        if scale is None or zero_point is None:
            continue
        codes = _quantize(g.constant(node.input[0]), scale, zero_point, _attribute(node, "axis", 1))
        g.set_constant(node.output[0], codes)
        g.graph.node.remove(node)
    g = _Graph(model)
    for transpose in [n for n in g.graph.node if n.op_type == "Transpose"]:
        dequant = g.produced_by(transpose.input[0], "DequantizeLinear")
        codes = g.constant(dequant.input[0]) if dequant is not None else None
        if codes is None or codes.ndim != 2 or len(g.consumers[dequant.output[0]]) != 1:
            continue
        g.set_constant(dequant.input[0], np.ascontiguousarray(codes.T))
        if g.constant(dequant.input[1]).ndim == 1:
            _set_axis(dequant, 1 - _attribute(dequant, "axis", 1))
        for consumer in g.consumers.get(transpose.output[0], []):
            consumer.input[:] = [dequant.output[0] if i == transpose.output[0] else i for i in consumer.input]
        g.graph.node.remove(transpose)
    _Graph(model).prune()
    return model


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for attr in list(node.attribute):
        if attr.name == "axis":
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute("axis", axis))


@dataclass
class _Operands:
    """A quantized layer's operands: the UINT8 input with its qparams, the INT8 weight with its."""

    input_codes: str
    input_scale: float
    input_zero_point: str
    weight: np.ndarray  # codes, laid out as the integer op reads them
    weight_scale: np.ndarray  # per output channel (or one value)
    weight_zero_point: np.ndarray


def _operands(g: _Graph, activation: str, weight: str) -> _Operands | None:
    """The operands when `activation` is DQ(Q(x)) and `weight` is DQ(constant codes), else None."""
    act_dq, w_dq = g.produced_by(activation, "DequantizeLinear"), g.produced_by(weight, "DequantizeLinear")
    if act_dq is None or w_dq is None or g.produced_by(act_dq.input[0], "QuantizeLinear") is None:
        return None
    codes, scale = g.constant(w_dq.input[0]), g.constant(w_dq.input[1])
    act_scale = g.constant(act_dq.input[1])
    if codes is None or scale is None or act_scale is None or act_scale.size != 1:
        return None
    zero_point = g.constant(w_dq.input[2]) if len(w_dq.input) > 2 else np.zeros((), np.int8)
    if zero_point is None or codes.dtype != np.int8:
        return None
    return _Operands(act_dq.input[0], float(act_scale), act_dq.input[2], codes, scale.astype(np.float32),
                     zero_point)


def _bias_of(g: _Graph, output: str) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The Add that adds a constant bias to `output`, when it is the only reader."""
    add = g.single_reader(output, "Add")
    if add is None:
        return None
    other = add.input[1] if add.input[0] == output else add.input[0]
    bias = g.constant(other)
    return (add, bias) if bias is not None else None


def _emit_integer_layer(g: _Graph, name: str, op_type: str, ops: _Operands, bias: np.ndarray | None,
                        output: str, channel_shape: tuple[int, ...], attributes: dict
                        ) -> list[onnx.NodeProto]:
    """integer op → Cast → Mul by input scale × weight scale (→ Add the float bias), writing `output`."""
    rescale = (ops.input_scale * ops.weight_scale).astype(np.float32)
    zero_point = ops.weight_zero_point
    if zero_point.ndim and np.all(zero_point == zero_point.flat[0]):
        zero_point = np.asarray(zero_point.flat[0], dtype=zero_point.dtype)
    g.set_constant(f"{name}.weight_int8", ops.weight)
    g.set_constant(f"{name}.weight_zero_point", zero_point)
    g.set_constant(f"{name}.rescale", rescale.reshape(channel_shape) if rescale.ndim else rescale)
    nodes = [helper.make_node(op_type, [ops.input_codes, f"{name}.weight_int8", ops.input_zero_point,
                                        f"{name}.weight_zero_point"], [f"{name}.int32"], f"{name}_integer",
                              **attributes)]
    nodes.append(helper.make_node("Cast", [f"{name}.int32"], [f"{name}.float"], f"{name}_cast",
                                  to=onnx.TensorProto.FLOAT))
    scaled = output if bias is None else f"{name}.scaled"
    nodes.append(helper.make_node("Mul", [f"{name}.float", f"{name}.rescale"], [scaled], f"{name}_rescale"))
    if bias is not None:
        g.set_constant(f"{name}.bias", bias.astype(np.float32).reshape(channel_shape))
        nodes.append(helper.make_node("Add", [scaled, f"{name}.bias"], [output], f"{name}_bias_add"))
    return nodes


def _rewrite(g: _Graph, node: onnx.NodeProto, index: int) -> list[onnx.NodeProto] | None:
    """The operator-format nodes replacing `node` (and its bias Add), or None when it is not quantized."""
    name = f"{node.name or node.op_type}_{index}".replace("/", "_").strip("_")
    if node.op_type == "MatMul":
        ops = _operands(g, node.input[0], node.input[1])
        if ops is None or ops.weight.ndim != 2:
            return None
        channels, attributes = (ops.weight.shape[1],), {}
    elif node.op_type == "Gemm":
        ops = _operands(g, node.input[0], node.input[1])
        if ops is None or _attribute(node, "transA", 0) or _attribute(node, "alpha", 1.0) != 1.0 \
                or _attribute(node, "beta", 1.0) != 1.0:
            return None
        if _attribute(node, "transB", 0):
            ops.weight = np.ascontiguousarray(ops.weight.T)
        channels, attributes = (ops.weight.shape[1],), {}
    elif node.op_type == "Conv":
        ops = _operands(g, node.input[0], node.input[1])
        if ops is None:
            return None
        channels = (1, ops.weight.shape[0], 1, 1)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    else:
        return None
    out_channels = ops.weight.shape[0] if node.op_type == "Conv" else ops.weight.shape[1]
    if ops.weight_scale.size not in (1, out_channels):
        return None  # scaled along another axis than the output channels: no integer op computes that
    integer_op = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
    bias = None
    if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
        bias = g.constant(node.input[2])
        if bias is None:
            return None  # a computed bias: left as it is
    output, removed = node.output[0], [node]
    if bias is None and node.op_type == "MatMul":
        found = _bias_of(g, node.output[0])
        if found is not None and found[1].shape == (ops.weight.shape[1],):
            add, bias = found
            output, removed = add.output[0], [node, add]
    nodes = _emit_integer_layer(g, name, integer_op, ops, bias, output, channels, attributes)
    for old in removed:
        g.graph.node.remove(old)
    return nodes


def to_operator_format(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite a QDQ model (after `fold_weight_quantizers`) into integer ops; QuantizedOnnxError when
    no layer is quantized. The input QuantizeLinear nodes stay: they feed the integer ops."""
    g = _Graph(model)
    rewritten = 0
    for index, node in enumerate(list(g.graph.node)):
        nodes = _rewrite(g, node, index)
        if nodes is not None:
            g.graph.node.extend(nodes)
            rewritten += 1
    if not rewritten:
        raise QuantizedOnnxError("no quantized MatMul, Gemm or Conv (DequantizeLinear on both operands) "
                                 "to rewrite into the operator format")
    _topological_sort(model.graph)
    _Graph(model).prune()
    return model


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is read (appended nodes land at the end)."""
    available = {i.name for i in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise QuantizedOnnxError("the rewritten graph has a cycle or an input nothing produces")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def count_integer_layers(model: onnx.ModelProto) -> dict[str, int]:
    """How many layers of each quantized form the model holds (QDQ MatMul/Gemm/Conv or integer ops)."""
    g = _Graph(model)
    counts = {"qdq": 0, "integer": 0}
    for node in g.graph.node:
        if node.op_type in ("MatMulInteger", "ConvInteger"):
            counts["integer"] += 1
        elif node.op_type in ("MatMul", "Gemm", "Conv") and _operands(g, node.input[0], node.input[1]):
            counts["qdq"] += 1
    return counts
