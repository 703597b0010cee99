"""Open an ONNX file with clear errors, and read its inputs and outputs as plain specs.

Every engine goes through `load_onnx` first, so a missing, corrupt or non-ONNX file is reported
here in one line instead of deep inside DeepSparse's or ONNX Runtime's native code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import InvalidModelError, ModelNotFoundError, first_line

Dim = int | None  # None: a dynamic (symbolic or unknown) dimension


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, shape (None for a dynamic dimension) and numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"({dims}) {self.dtype}"


def model_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, after checking that it is an existing file."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"ONNX model not found: {path}")
    if not path.is_file():
        raise InvalidModelError(f"{path} is a directory, not an ONNX file")
    return path


def load_onnx(path: str | os.PathLike, *, load_weights: bool = False) -> onnx.ModelProto:
    """Parse and check an ONNX file; weights stored as external data are read only with load_weights."""
    path = model_path(path)
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf DecodeError, or an external-data file that is missing
        raise InvalidModelError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
    if not model.graph.output or not model.graph.node:
        raise InvalidModelError(f"{path} is not an ONNX model: it parses but has no graph nodes or outputs")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise InvalidModelError(f"{path} fails the ONNX checker: {first_line(exc)}") from exc
    return model


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers (old exporters list both)."""
    initializers = {init.name for init in model.graph.initializer}
    return [_spec(value) for value in model.graph.input if value.name not in initializers]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph outputs, in the order engines return them."""
    return [_spec(value) for value in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError):
        dtype = np.dtype(object)
    return TensorSpec(value.name, shape, dtype)

