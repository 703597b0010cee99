"""The engine registry and `create_engine`, the one way the rest of vitsparse builds an engine."""

from __future__ import annotations

import os

from .availability import engine_status
from .deepsparse_engine import DeepSparseEngine
from .engine_base import Engine
from .errors import EngineUnavailableError, UnknownEngineError
from .onnxruntime_engine import OnnxRuntimeEngine
from .openvino_engine import OpenVinoEngine
from .openvino_sparse_engine import OpenVinoSparseEngine

ENGINE_TYPES: dict[str, type[Engine]] = {
    cls.name: cls for cls in (DeepSparseEngine, OnnxRuntimeEngine, OpenVinoEngine, OpenVinoSparseEngine)
}


def parse_engine_spec(spec: str) -> tuple[str, str | None]:
    """'openvino:bf16' -> ('openvino', 'bf16'); 'onnxruntime' -> ('onnxruntime', None)."""
    name, _, precision = spec.partition(":")
    return name, precision or None


def check_engine_spec(spec: str) -> None:
    """Without a model: UnknownEngineError, EngineUnavailableError or UnsupportedPrecisionError when
    `spec` (an engine name, optionally ':precision') cannot run here."""
    name, precision = parse_engine_spec(spec)
    _engine_type(name).check_precision(precision)


def _engine_type(name: str) -> type[Engine]:
    """The registered engine class, or why it cannot run here."""
    if name not in ENGINE_TYPES:
        raise UnknownEngineError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_TYPES)}")
    status = engine_status(name)
    if not status.available:
        raise EngineUnavailableError(f"engine {name!r} is not available here: {status.reason}")
    return ENGINE_TYPES[name]


def create_engine(name: str, model_path: str | os.PathLike, *, batch_size: int = 1,
                  num_cores: int | None = None, num_streams: int | None = None,
                  precision: str | None = None) -> Engine:
    """Compile `model_path` on engine `name` ("deepsparse", "onnxruntime", "openvino" or "openvino-sparse")
    for batch_size items per call.

    num_cores=None uses every physical core; num_streams > 1 lets that many calls run concurrently
    (DeepSparse's multi-stream scheduler, OpenVINO's throughput mode; ONNX Runtime sessions are always
    thread-safe). precision: the float layers' precision hint ("f32"; OpenVINO also "bf16"); None is
    the engine's default.
    """
    return _engine_type(name)(model_path, batch_size=batch_size, num_cores=num_cores, num_streams=num_streams,
                              precision=precision)
