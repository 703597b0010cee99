"""The export rewrite that lets an INT8 kernel node compute the LayerNorm in front of it.

In a ViT block a LayerNorm feeds qkv and the MLP. torch exports it as

    ReduceMean → Sub → Pow(2) → ReduceMean → Add(epsilon) → Sqrt → Div → Mul(gamma) → Add(beta)

(opset 17 and later: one LayerNormalization node). OpenVINO runs it as a normalization node and a
scale-and-shift node that write the normalized x, which the kernel node then reads again to quantize
it. A SparseLinear or SparseMLP node with `norm_epsilon` reads the LayerNorm's input instead and
normalizes each row where it quantizes it; gamma and beta become two inputs after its weight (before
its addend). The rewrite applies where the kernel node is the LayerNorm's only reader, the LayerNorm
runs over the last axis, and gamma and beta hold one value per input channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .quantized_onnx import _attribute, _Graph
from .sparse_onnx import LINEAR_INPUTS, MLP_INPUTS, MLP_OP_TYPE, OP_TYPE


@dataclass
class _NormMatch:
    """A LayerNorm over the last axis of `x`."""

    x: str
    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float


def _constant_operand(g: _Graph, node: onnx.NodeProto, operand: str) -> np.ndarray | None:
    """The constant a binary node combines `operand` with, or None."""
    others = [name for name in node.input if name != operand]
    return g.constant(others[0]) if len(others) == 1 and len(node.input) == 2 else None


def _over_last_axis(g: _Graph, reduce: onnx.NodeProto | None, rank: int | None) -> bool:
    """Whether a ReduceMean averages over the last axis only and keeps it (axes an attribute, or from
    opset 18 an input)."""
    if reduce is None or _attribute(reduce, "keepdims", 1) != 1:
        return False
    axes = _attribute(reduce, "axes") if len(reduce.input) < 2 else g.constant(reduce.input[1])
    axes = [] if axes is None else [int(a) for a in np.ravel(axes)]
    return axes == [-1] or (rank is not None and axes == [rank - 1])


def _input_from(g: _Graph, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
    """The first of `node`'s inputs produced by an `op_type` node: that node, or None."""
    return next((found for name in node.input if (found := g.produced_by(name, op_type)) is not None), None)


def _affine_end(g: _Graph, output: str, channels: int) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(normalized, gamma, beta) where `output` = normalized × gamma + beta, each a constant of
    `channels` values."""
    add = g.produced_by(output, "Add")
    mul = None if add is None else _input_from(g, add, "Mul")
    if mul is None or g.consumers.get(mul.output[0], []) != [add]:
        return None
    beta = _constant_operand(g, add, mul.output[0])
    div = _input_from(g, mul, "Div")
    gamma = None if div is None else _constant_operand(g, mul, div.output[0])
    if beta is None or gamma is None or beta.size != channels or gamma.size != channels:
        return None
    return div.output[0], gamma.reshape(channels), beta.reshape(channels)


def _match_decomposed(g: _Graph, output: str, channels: int, shapes: dict) -> _NormMatch | None:
    """The chain in the module docstring ending at `output`."""
    found = _affine_end(g, output, channels)
    div = None if found is None else g.produced_by(found[0], "Div")
    sub = None if div is None else g.produced_by(div.input[0], "Sub")
    sqrt = None if div is None else g.produced_by(div.input[1], "Sqrt")
    add_eps = None if sqrt is None else g.produced_by(sqrt.input[0], "Add")
    if sub is None or add_eps is None or len(g.consumers.get(div.output[0], [])) != 1:
        return None
    x, rank = sub.input[0], len(shapes.get(sub.input[0], ())) or None
    mean = g.produced_by(sub.input[1], "ReduceMean")
    variance = _input_from(g, add_eps, "ReduceMean")
    square = None if variance is None else g.produced_by(variance.input[0], "Pow")
    epsilon = None if variance is None else _constant_operand(g, add_eps, variance.output[0])
    exponent = None if square is None else g.constant(square.input[1])
    if mean is None or mean.input[0] != x or square is None or square.input[0] != sub.output[0] \
            or exponent is None or exponent.size != 1 or float(exponent.reshape(())) != 2.0 \
            or epsilon is None or epsilon.size != 1 or not float(epsilon.reshape(())) > 0 \
            or not (_over_last_axis(g, mean, rank) and _over_last_axis(g, variance, rank)):
        return None
    return _NormMatch(x, found[1], found[2], float(epsilon.reshape(())))


def _match_layer_normalization(g: _Graph, output: str, channels: int) -> _NormMatch | None:
    """ONNX's LayerNormalization over the last axis with a per-channel scale and bias."""
    node = g.produced_by(output, "LayerNormalization")
    if node is None or len(node.input) < 3 or len(node.output) != 1 or _attribute(node, "axis", -1) != -1:
        return None
    gamma, beta = g.constant(node.input[1]), g.constant(node.input[2])
    if gamma is None or beta is None or gamma.size != channels or beta.size != channels:
        return None
    return _NormMatch(node.input[0], gamma.reshape(channels), beta.reshape(channels),
                      float(_attribute(node, "epsilon", 1e-5)))


def _norm_inputs_at(node: onnx.NodeProto) -> int | None:
    """Where an INT8 kernel node without a LayerNorm takes gamma and beta (after its weight), or None."""
    if _attribute(node, "norm_epsilon"):
        return None
    if node.op_type == OP_TYPE and _attribute(node, "format") == "int8_1x4":
        return LINEAR_INPUTS["int8_1x4"]
    return MLP_INPUTS if node.op_type == MLP_OP_TYPE else None


def fuse_layer_norms(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Let each INT8 kernel node whose x is a LayerNorm's output compute it (module docstring), in place;
    the LayerNorm's nodes are left for a prune. Returns how many nodes took one in."""
    g = _Graph(model)
    graph_outputs = {output.name for output in g.graph.output}
    fused = 0
    for node in list(g.graph.node):
        index = _norm_inputs_at(node)
        if index is None or len(g.consumers.get(node.input[0], [])) != 1 or node.input[0] in graph_outputs:
            continue
        channels = int(_attribute(node, "in_features"))
        match = _match_decomposed(g, node.input[0], channels, shapes) \
            or _match_layer_normalization(g, node.input[0], channels)
        if match is None:
            continue
        g.set_constant(f"{node.name}.norm_gamma", match.gamma.astype(np.float32))
        g.set_constant(f"{node.name}.norm_beta", match.beta.astype(np.float32))
        node.input[0] = match.x
        node.input.insert(index, f"{node.name}.norm_beta")
        node.input.insert(index, f"{node.name}.norm_gamma")
        node.attribute.append(helper.make_attribute("norm_epsilon", match.epsilon))
        fused += 1
    return fused
