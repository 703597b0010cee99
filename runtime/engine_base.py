"""The one interface every CPU engine implements: compile an ONNX file for a batch size, run numpy.

Subclasses only build the native engine (`_load`) and call it (`_run`); checking the file, the
batch size and every input's shape and dtype happens here, before any native code sees them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from .batch_size import check_batch_size, fixed_batch_size
from .errors import EngineLoadError, InputMismatchError, RuntimeInputError, UnsupportedPrecisionError
from .onnx_file import TensorSpec, graph_inputs, graph_outputs, load_onnx
from .quantized import check_int8_support, quantization_format
from .sparse_extension import check_sparse_nodes


class Engine(ABC):
    """An ONNX model compiled for `batch_size` items per call on `num_cores` cores (None: all)."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("f32",)  # the precision hints the engine accepts

    def __init__(self, model_path: str | os.PathLike, *, batch_size: int = 1, num_cores: int | None = None,
                 num_streams: int | None = None, precision: str | None = None) -> None:
        _check_positive(batch_size=batch_size, num_cores=num_cores, num_streams=num_streams)
        self.check_precision(precision)
        model = load_onnx(model_path)
        check_batch_size(model, batch_size, model_path)
        check_int8_support(self.name, model, model_path)
        check_sparse_nodes(self.name, model, model_path)
        self.model_path = Path(model_path)
        self.batch_size = batch_size
        self.num_cores = num_cores
        self.num_streams = num_streams or 1
        self.precision = precision  # None: the default, f32 on every engine
        self.quantization = quantization_format(model)
        self.inputs = [_with_batch(spec, batch_size) for spec in graph_inputs(model)]
        self.outputs = graph_outputs(model)
        self._load_with_hint(model)

    @classmethod
    def check_precision(cls, precision: str | None) -> None:
        """UnsupportedPrecisionError for a precision hint the engine does not offer (None: its default)."""
        if precision is not None and precision not in cls.precisions:
            raise UnsupportedPrecisionError(f"engine {cls.name!r} runs float layers in "
                                            f"{' or '.join(cls.precisions)}, not {precision!r}")

    def _load_with_hint(self, model: onnx.ModelProto) -> None:
        """`_load`, adding the likely cause when the engine fails at a batch size other than the file's."""
        try:
            self._load(model)
        except EngineLoadError as exc:
            exported = fixed_batch_size(model)
            if exported in (None, self.batch_size):
                raise
            raise EngineLoadError(f"{exc} (the file was exported at batch {exported}, which its graph may "
                                  f"bake into constants: use batch_size={exported} or re-export at batch "
                                  f"{self.batch_size})") from exc

    @abstractmethod
    def _load(self, model: onnx.ModelProto) -> None:
        """Build the native engine; `model` is the parsed file (external weights not loaded)."""

    @abstractmethod
    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Call the native engine on inputs already checked against `self.inputs`."""

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def input_shapes(self) -> list[tuple[int | None, ...]]:
        """The shapes `run` accepts, batch dimension included; None marks a dynamic dimension."""
        return [spec.shape for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    @property
    def effective_precision(self) -> str:
        """The precision the float layers run in (INT8 layers of a quantized file run in INT8)."""
        return self.precision or "f32"

    @property
    def fraction_of_supported_ops(self) -> float | None:
        """Share of the graph the engine runs in its own optimised runtime; None if it does not say."""
        return None

    @property
    def int8_mac_share(self) -> float | None:
        """Share of the file's MatMul/Gemm/Conv MACs the engine runs in INT8; None if it does not say."""
        return None

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch: inputs in `input_names` order, outputs in `output_names` order."""
        arrays = check_inputs(self.inputs, inputs)
        return self._run(arrays)

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Inputs of the compiled shapes and dtypes (standard normal floats, zeros otherwise)."""
        rng = np.random.default_rng(seed)
        arrays = []
        for spec in self.inputs:
            if any(dim is None for dim in spec.shape):
                raise InputMismatchError(f"input {spec.name!r} has a dynamic dimension {spec.describe()}; "
                                         f"pass inputs explicitly")
            if spec.dtype.kind == "f":
                arrays.append(rng.standard_normal(spec.shape).astype(spec.dtype))
            else:
                arrays.append(np.zeros(spec.shape, dtype=spec.dtype))
        return arrays

    def describe(self) -> dict[str, object]:
        """What ran: engine, file, batch size, cores, streams, shapes and supported-op fraction."""
        return {"engine": self.name, "model": str(self.model_path), "batch_size": self.batch_size,
                "num_cores": self.num_cores, "num_streams": self.num_streams,
                "precision": self.effective_precision, "quantization": self.quantization,
                "inputs": {spec.name: spec.describe() for spec in self.inputs},
                "fraction_of_supported_ops": self.fraction_of_supported_ops,
                "int8_mac_share": self.int8_mac_share}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.model_path)!r}, batch_size={self.batch_size}, "
                f"num_cores={self.num_cores}, num_streams={self.num_streams})")


def check_inputs(specs: Sequence[TensorSpec], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The inputs as a list, after checking count, type, shape and dtype against the compiled specs."""
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
        raise InputMismatchError(f"inputs must be a list of {len(specs)} numpy array(s), "
                                 f"got {type(inputs).__name__}")
    if len(inputs) != len(specs):
        raise InputMismatchError(f"expected {len(specs)} input(s) {[s.name for s in specs]}, "
                                 f"got {len(inputs)}")
    for index, (spec, array) in enumerate(zip(specs, inputs, strict=True)):
        if not isinstance(array, np.ndarray):
            raise InputMismatchError(f"input {index} {spec.name!r} must be a numpy array, "
                                     f"got {type(array).__name__}")
        if not _shape_matches(spec.shape, array.shape) or array.dtype != spec.dtype:
            raise InputMismatchError(f"input {index} {spec.name!r}: expected shape {spec.describe()}, "
                                     f"got {tuple(array.shape)} {array.dtype}")
    return list(inputs)


def _shape_matches(expected: tuple[int | None, ...], got: tuple[int, ...]) -> bool:
    return len(expected) == len(got) and all(e is None or e == g for e, g in zip(expected, got, strict=True))


def _with_batch(spec: TensorSpec, batch_size: int) -> TensorSpec:
    shape = (batch_size, *spec.shape[1:]) if spec.shape else spec.shape
    return TensorSpec(spec.name, shape, spec.dtype)


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RuntimeInputError(f"{name} must be a positive integer, got {value!r}")
