"""CPU inference runtime. Imports numpy/onnx/deepsparse/onnxruntime/openvino only, never torch.

DeepSparse, ONNX Runtime and OpenVINO are imported lazily, when an engine is built, so importing this
package stays cheap and works where neither is installed.
"""

from .atomic import write_json_atomic
from .availability import ENGINES, EngineStatus, default_engine, engine_status, engine_versions
from .batch_size import check_batch_size, set_batch_size
from .bench_cli import configure_bench_parser, run_bench
from .benchmark import SCENARIOS, benchmark, benchmark_model
from .compare import compare_side_by_side
from .deepsparse_engine import DeepSparseEngine
from .engine_base import Engine
from .engine_registry import ENGINE_TYPES, check_engine_spec, create_engine, parse_engine_spec
from .errors import (
    BatchSizeError,
    EngineLoadError,
    EngineUnavailableError,
    InputMismatchError,
    InvalidModelError,
    ModelNotFoundError,
    RuntimeInputError,
    UnknownEngineError,
    UnsupportedPrecisionError,
)
from .onnx_file import TensorSpec, load_onnx
from .onnx_sparsity import LayerMacs, OnnxReport, WeightStats, inspect_onnx
from .onnxruntime_engine import OnnxRuntimeEngine
from .openvino_engine import OpenVinoEngine
from .results import BenchmarkResult, latency_summary

__all__ = [
    "ENGINES", "ENGINE_TYPES", "SCENARIOS", "BatchSizeError", "BenchmarkResult", "DeepSparseEngine",
    "Engine", "EngineLoadError", "EngineStatus", "EngineUnavailableError", "InputMismatchError",
    "InvalidModelError", "LayerMacs", "ModelNotFoundError", "OnnxReport", "OnnxRuntimeEngine",
    "OpenVinoEngine", "RuntimeInputError", "TensorSpec", "UnknownEngineError",
    "UnsupportedPrecisionError", "WeightStats", "benchmark", "benchmark_model", "check_batch_size",
    "check_engine_spec", "compare_side_by_side", "configure_bench_parser", "create_engine",
    "default_engine", "engine_status", "engine_versions", "inspect_onnx", "latency_summary", "load_onnx",
    "parse_engine_spec", "run_bench", "set_batch_size", "write_json_atomic",
]
