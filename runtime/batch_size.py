"""Run an ONNX file at another batch size than the one it was exported with, or say why it cannot.

DeepSparse compiles for one static batch size and overrides the leading dimension of every graph
input with it, whether that dimension is symbolic or fixed. vitsparse exports at a static batch
size, so a file written at batch 1 is routinely compiled at batch 8. That only works when the
graph does not bake the batch into constants (a `Reshape` to [1, 197, 3, 6, 64], say): DeepSparse
1.8 then aborts the whole process in its planner. `check_batch_size` catches that case first by
shape inference: with the inputs set to the new batch, every output must follow it.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, shape_inference

from .errors import BatchSizeError, first_line
from .kernel_nodes import matmul_stand_ins
from .onnx_file import graph_inputs

SHAPE_ONLY_MIN_NUMEL = 1024  # initializers at least this large keep only their shape in `shape_only`


def set_batch_size(model: onnx.ModelProto, batch_size: int) -> onnx.ModelProto:
    """A copy with the leading dimension of every graph input set to batch_size, outputs left free."""
    names = {spec.name for spec in graph_inputs(model)}
    model = copy.deepcopy(model)
    _override_batch(model, batch_size, names)
    return model


def _override_batch(model: onnx.ModelProto, batch_size: int, input_names: set[str]) -> None:
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in input_names and len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_value = batch_size
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]


def shape_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy for shape inference: large float initializers become graph inputs of the same type.

    Integer initializers (Reshape targets, indices) keep their values, which shape inference needs.
    vitsparse's sparse-kernel nodes become MatMuls of the same shapes (kernel_nodes.py).
    """
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, part).extend(getattr(source, part))
    input_names = {value.name for value in source.input}
    for init in source.initializer:
        numel = int(np.prod(init.dims)) if init.dims else 1
        if helper.tensor_dtype_to_np_dtype(init.data_type).kind in "fc" and numel >= SHAPE_ONLY_MIN_NUMEL:
            if init.name not in input_names:
                graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)
    matmul_stand_ins(graph)
    return light


def infer_shapes(model: onnx.ModelProto, batch_size: int | None = None, *,
                 strict: bool = False) -> onnx.ModelProto:
    """Shape inference with constant propagation on a shape-only copy, inputs set to batch_size if given.

    strict=False never raises: where onnx cannot infer an op it keeps the shapes the file declares.
    strict=True raises onnx's InferenceError on a shape conflict.
    """
    light = shape_only(model)
    if batch_size is not None:
        _override_batch(light, batch_size, {spec.name for spec in graph_inputs(model)})
    try:
        return shape_inference.infer_shapes(light, strict_mode=strict, data_prop=True)
    except Exception:
        if strict:
            raise
        return light


def fixed_batch_size(model: onnx.ModelProto) -> int | None:
    """The batch size the file was exported with, or None when its batch dimension is symbolic."""
    leading = {spec.shape[0] for spec in graph_inputs(model) if spec.shape}
    return leading.pop() if len(leading) == 1 else None


def check_batch_size(model: onnx.ModelProto, batch_size: int, path: object = "model") -> None:
    """Raise BatchSizeError when the graph cannot follow inputs of batch_size (the batch is baked in).

    Two signs, both from shape inference with the inputs set to batch_size: a shape conflict that
    the file as exported does not have (a Concat of batch-1 constants with batch-8 tensors, say), or
    an output that followed the batch as exported (leading dimension symbolic or equal to the inputs')
    but no longer does.
    """
    if batch_size < 1:
        raise BatchSizeError(f"batch_size must be >= 1, got {batch_size}")
    exported = fixed_batch_size(model)
    if exported == batch_size:
        return
    advice = f"use batch_size={exported} or re-export the model at batch {batch_size}" if exported else \
        f"re-export the model at batch {batch_size}"
    conflict = _new_shape_conflict(model, batch_size)
    if conflict:
        raise BatchSizeError(f"{path} cannot run at batch_size={batch_size}: the graph bakes its batch size "
                             f"into constants ({conflict}); {advice}")
    before = _leading_dims(infer_shapes(model))
    after = _leading_dims(infer_shapes(model, batch_size))
    for name, dim in after.items():
        follows = before.get(name, None) in (None, exported)
        if follows and dim is not None and dim != batch_size:
            raise BatchSizeError(
                f"{path} cannot run at batch_size={batch_size}: with inputs of batch {batch_size} its output "
                f"{name!r} still has batch {dim}, so the graph bakes the batch size into constants "
                f"(e.g. Reshape targets); {advice}")


def _new_shape_conflict(model: onnx.ModelProto, batch_size: int) -> str | None:
    """onnx's message for a shape conflict that appears only at batch_size, else None."""
    try:
        infer_shapes(model, batch_size, strict=True)
        return None
    except Exception as exc:
        message = first_line(exc, limit=200)
    try:
        infer_shapes(model, strict=True)
    except Exception:
        return None  # onnx cannot infer this graph even as exported: no evidence either way
    return message


def _leading_dims(model: onnx.ModelProto) -> dict[str, int | None]:
    dims = {}
    for output in model.graph.output:
        shape = output.type.tensor_type.shape.dim
        if len(shape) > 0:
            dims[output.name] = shape[0].dim_value if shape[0].HasField("dim_value") else None
    return dims
