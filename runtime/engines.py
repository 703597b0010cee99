"""The engine registry and `create_engine`, the one way the rest of vitsparse builds an engine."""

from __future__ import annotations

import os

from .availability import engine_status
from .deepsparse_engine import DeepSparseEngine
from .engine import Engine
from .errors import EngineUnavailableError, UnknownEngineError
from .onnxruntime_engine import OnnxRuntimeEngine

ENGINE_TYPES: dict[str, type[Engine]] = {cls.name: cls for cls in (DeepSparseEngine, OnnxRuntimeEngine)}


def create_engine(name: str, model_path: str | os.PathLike, *, batch_size: int = 1,
                  num_cores: int | None = None, num_streams: int | None = None) -> Engine:
    """Compile `model_path` on engine `name` ("deepsparse" or "onnxruntime") for batch_size items per call.

    num_cores=None uses every physical core; num_streams > 1 lets that many calls run concurrently
    (DeepSparse's multi-stream scheduler; ONNX Runtime sessions are always thread-safe).
    """
    if name not in ENGINE_TYPES:
        raise UnknownEngineError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_TYPES)}")
    status = engine_status(name)
    if not status.available:
        raise EngineUnavailableError(f"engine {name!r} is not available here: {status.reason}")
    return ENGINE_TYPES[name](model_path, batch_size=batch_size, num_cores=num_cores, num_streams=num_streams)
