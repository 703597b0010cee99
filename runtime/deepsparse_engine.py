"""DeepSparse behind the `Engine` interface: a sparse-aware CPU engine compiled for one batch size.

DeepSparse 1.8 overrides the leading dimension of every input with `batch_size` (fixed or not;
`Engine` has checked that the graph allows it). Its default scheduler runs requests from several
threads one after another, so `num_streams` > 1 selects the multi-stream scheduler; DeepSparse caps
the streams at `num_cores` and `self.num_streams` reports the capped value.
"""

from __future__ import annotations

import numpy as np
import onnx

from .engine import Engine
from .errors import EngineLoadError, EngineUnavailableError, first_line


class DeepSparseEngine(Engine):
    """deepsparse.Engine(model, batch_size, num_cores, num_streams) with clear errors."""

    name = "deepsparse"

    def _load(self, model: onnx.ModelProto) -> None:
        try:
            import deepsparse
        except ImportError as exc:  # installed but broken (e.g. a numpy 2 it cannot load)
            raise EngineUnavailableError(f"DeepSparse cannot be imported here: {exc}") from exc
        scheduler = "multi_stream" if self.num_streams > 1 else None
        try:
            self._engine = deepsparse.Engine(model=str(self.model_path), batch_size=self.batch_size,
                                             num_cores=self.num_cores, num_streams=self.num_streams,
                                             scheduler=scheduler)
        except Exception as exc:  # the native compiler's RuntimeError("NM: error: ...")
            message = first_line(exc)
            raise EngineLoadError(f"DeepSparse could not compile {self.model_path}: {message}") from exc
        self.num_cores = self._engine.num_cores
        self.num_streams = self._engine.num_streams

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self._engine.run([np.ascontiguousarray(array) for array in inputs], val_inp=False)

    @property
    def fraction_of_supported_ops(self) -> float:
        """Share of the graph DeepSparse runs in its optimised runtime (1.0: all of it)."""
        return float(self._engine.fraction_of_supported_ops)
