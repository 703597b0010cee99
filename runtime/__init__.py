"""CPU inference runtime. Imports numpy/onnx/deepsparse/onnxruntime only, never torch."""

from .availability import ENGINES, EngineStatus, default_engine, engine_status

__all__ = ["ENGINES", "EngineStatus", "default_engine", "engine_status"]
