"""Per-weight sparsity and per-layer MACs of an ONNX file, read without running it.

Weights are the initializers: float ones, and integer ones that a DequantizeLinear reads as its data
(INT8 weights); other integer arrays are shapes, indices and zero points. The prunable layers are
MatMul, Gemm and Conv; their weights are the initializers with ndim >= 2 that feed one of them
(directly or through Transpose/Identity/Cast/DequantizeLinear). A sparse-kernel node's product
(kernel_nodes.py) counts as one prunable weight of its dense shape, with its stored non-zeros, in place
of its packed arrays.
MACs are counted for every MatMul, Gemm and Conv node (attention matmuls included), and for each
product of a sparse-kernel node as the dense product it replaces, as output numel x reduction
dimension, with shapes from onnx shape inference at a batch of 1 when the batch is symbolic;
elementwise ops, norms and softmax are not counted, as in compiler/flops.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .batch_size import fixed_batch_size, infer_shapes
from .kernel_nodes import kernel_layers
from .onnx_file import load_onnx

PRUNABLE_OPS = ("MatMul", "Gemm", "Conv")
PASSTHROUGH_OPS = ("Transpose", "Identity", "Cast", "DequantizeLinear")
Shape = tuple[int, ...]


@dataclass
class WeightStats:
    """One initializer: its size, non-zeros, sparsity, and the prunable op it feeds, if any."""

    name: str
    shape: Shape
    dtype: str
    numel: int
    nonzeros: int
    sparsity: float
    layer_op: str | None = None
    param: bool = True  # a model parameter, not a shape, index or zero point


@dataclass
class LayerMacs:
    """One MatMul/Gemm/Conv node, or one product of a sparse-kernel node (kernel_nodes.py): its output
    shape and MACs (None when shapes are unknown), a sparse product's counted as the dense one it replaces."""

    name: str
    op_type: str
    output_shape: Shape | None
    macs: int | None
    int8_kernel: bool = False  # a sparse-kernel product computed in INT8


@dataclass
class OnnxReport:
    """Weights, prunable-layer sparsity and MACs of one ONNX file (MACs for `batch_size` items)."""

    path: str
    batch_size: int
    params: int
    nonzero_params: int
    prunable_params: int
    prunable_nonzeros: int
    prunable_sparsity: float
    macs: int
    layers_without_macs: int
    weights: list[WeightStats] = field(default_factory=list)
    layers: list[LayerMacs] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def inspect_onnx(path: str | os.PathLike) -> OnnxReport:
    """Read an ONNX file's weights and shapes: per-weight sparsity, totals and MACs."""
    model = load_onnx(path, load_weights=True)
    weights = _weight_stats(model)
    params = [w for w in weights if w.param]
    prunable = [w for w in weights if w.layer_op is not None]
    prunable_numel = sum(w.numel for w in prunable)
    prunable_nonzeros = sum(w.nonzeros for w in prunable)
    batch = fixed_batch_size(model) or 1
    layers = _layer_macs(model, batch)
    return OnnxReport(
        path=str(path), batch_size=batch, params=sum(w.numel for w in params),
        nonzero_params=sum(w.nonzeros for w in params), prunable_params=prunable_numel,
        prunable_nonzeros=prunable_nonzeros,
        prunable_sparsity=1.0 - prunable_nonzeros / prunable_numel if prunable_numel else 0.0,
        macs=sum(layer.macs or 0 for layer in layers),
        layers_without_macs=sum(layer.macs is None for layer in layers), weights=weights, layers=layers)


def layer_macs(path: str | os.PathLike) -> list[LayerMacs]:
    """MACs of each MatMul/Gemm/Conv node at the file's batch size, without reading weight values."""
    model = load_onnx(path)
    return _layer_macs(model, fixed_batch_size(model) or 1)


def _weight_stats(model: onnx.ModelProto) -> list[WeightStats]:
    feeds = _prunable_consumers(model)
    graph = model.graph
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear" and node.input}
    kernels = [layer for layers in kernel_layers(graph).values() for layer in layers]
    packed_values = {layer.values for layer in kernels}
    stats, stored = [], {}  # stored: a kernel node's values, kept until its product is counted
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.name in packed_values:
            stored[init.name] = array
            continue
        stats.append(_stats(init.name, tuple(array.shape), str(array.dtype), int(np.count_nonzero(array)),
                            feeds.get(init.name) if array.ndim >= 2 else None,
                            param=array.dtype.kind not in "iub" or init.name in dequantized))
    for layer in kernels:
        if layer.values in stored:
            nonzeros = _stored_nonzeros(layer.format, stored[layer.values])
            stats.append(_stats(f"{layer.name}/weight", (layer.out_features, layer.in_features),
                                KERNEL_DTYPES.get(layer.format, "float32"), nonzeros, layer.op_type))
    return stats


KERNEL_DTYPES = {"int8_1x4": "int8", "bf16_1x2": "bfloat16", "f32_csr": "float32"}


def _stats(name: str, shape: Shape, dtype: str, nonzeros: int, layer_op: str | None,
           param: bool = True) -> WeightStats:
    numel = math.prod(shape)
    sparsity = 1.0 - nonzeros / numel if numel else 0.0
    return WeightStats(name, shape, dtype, numel, nonzeros, sparsity, layer_op, param)


def _stored_nonzeros(form: str, values: np.ndarray) -> int:
    """Non-zero weights among a packed weight's stored values (bf16 pairs are int32s of two bfloat16s)."""
    if form == "bf16_1x2":
        return int(np.count_nonzero(np.ascontiguousarray(values).view(np.uint16) & 0x7FFF))
    return int(np.count_nonzero(values))


def _prunable_consumers(model: onnx.ModelProto) -> dict[str, str]:
    """Initializer name -> op type of the MatMul/Gemm/Conv it feeds, looking through passthrough ops."""
    initializers = {init.name for init in model.graph.initializer}
    produced_from = {node.output[0]: node.input[0] for node in model.graph.node
                     if node.op_type in PASSTHROUGH_OPS and node.input and node.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in PRUNABLE_OPS:
            continue
        for name in node.input[:2]:
            while name not in initializers and name in produced_from:
                name = produced_from[name]
            if name in initializers:
                found.setdefault(name, node.op_type)
    return found


def _layer_macs(model: onnx.ModelProto, batch_size: int) -> list[LayerMacs]:
    inferred = infer_shapes(model, batch_size)  # sparse-kernel nodes in it: MatMuls named after them
    kernels = {layer.name: layer for layers in kernel_layers(model.graph).values() for layer in layers}
    shapes = _known_shapes(inferred)
    layers = []
    for index, node in enumerate(inferred.graph.node):
        if node.op_type not in PRUNABLE_OPS:
            continue
        out = shapes.get(node.output[0])
        reduction = _REDUCTION[node.op_type](node, shapes)
        macs = math.prod(out) * reduction if out is not None and reduction is not None else None
        kernel = kernels.get(node.name)
        op_type = kernel.op_type if kernel else node.op_type
        layers.append(LayerMacs(node.name or f"{node.op_type}_{index}", op_type, out, macs,
                                bool(kernel and kernel.int8)))
    return layers


def _known_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Every fully known tensor shape: graph inputs/outputs, inferred values and initializers."""
    shapes: dict[str, Shape] = {}
    graph = model.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    shapes.update({init.name: tuple(init.dims) for init in graph.initializer})
    return shapes


def _matmul_reduction(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    a = shapes.get(node.input[0])
    return a[-1] if a else None


def _gemm_reduction(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    a = shapes.get(node.input[0])
    trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
    return (a[0] if trans_a else a[1]) if a and len(a) == 2 else None


def _conv_reduction(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    w = shapes.get(node.input[1])
    return math.prod(w[1:]) if w and len(w) >= 3 else None  # C_in/group x kernel


_REDUCTION: dict[str, Callable[[onnx.NodeProto, dict[str, Shape]], int | None]] = {
    "MatMul": _matmul_reduction, "Gemm": _gemm_reduction, "Conv": _conv_reduction}
