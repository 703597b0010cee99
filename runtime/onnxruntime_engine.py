"""ONNX Runtime behind the `Engine` interface: the production-licensed CPU baseline.

One InferenceSession on the CPU execution provider, all graph optimisations, sequential execution
and `num_cores` intra-op threads (None: ONNX Runtime's default, one per physical core). With
num_streams > 1 the cores are shared out as DeepSparse does: each of the concurrent calls gets
num_cores // num_streams threads, so that N streams do not oversubscribe the cores. A file with
a fixed batch dimension other than `batch_size` is rewritten in memory to that batch size first,
as DeepSparse does itself; a symbolic batch dimension is left symbolic.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .batch_size import set_batch_size
from .engine_base import Engine
from .errors import EngineLoadError, EngineUnavailableError, first_line
from .onnx_file import graph_inputs

MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a model passed to ONNX Runtime as bytes


class OnnxRuntimeEngine(Engine):
    """onnxruntime.InferenceSession(model, CPUExecutionProvider) with clear errors."""

    name = "onnxruntime"

    def _load(self, model: onnx.ModelProto) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineUnavailableError(f"ONNX Runtime cannot be imported here: {exc}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads_per_call()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no warnings about unused initializers
        source = self._source(model)
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            message = first_line(exc)
            raise EngineLoadError(f"ONNX Runtime could not load {self.model_path}: {message}") from exc
        self._output_names = [output.name for output in self._session.get_outputs()]

    def _threads_per_call(self) -> int:
        """Intra-op threads for one call: all of num_cores for one stream, a share of them for several."""
        if self.num_streams == 1:
            return self.num_cores or 0  # 0: ONNX Runtime's default
        return max(1, (self.num_cores or _available_cores()) // self.num_streams)

    def _source(self, model: onnx.ModelProto) -> str | bytes:
        """The file itself, or the model rewritten to `batch_size` when its batch dimension is fixed."""
        fixed = {spec.shape[0] for spec in graph_inputs(model) if spec.shape and spec.shape[0] is not None}
        if fixed <= {self.batch_size}:
            return str(self.model_path)
        full = onnx.load(str(self.model_path))  # with external weights, since it is passed as bytes
        if full.ByteSize() > MAX_PROTO_BYTES:
            raise EngineLoadError(f"{self.model_path} is over 2 GB and has a fixed batch dimension; "
                                  f"ONNX Runtime can only run it at its exported batch size")
        return set_batch_size(full, self.batch_size).SerializeToString()

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feeds = dict(zip(self.input_names, inputs, strict=True))
        return self._session.run(self._output_names, feeds)


def _available_cores() -> int:
    """CPUs this process may run on (its affinity set where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
