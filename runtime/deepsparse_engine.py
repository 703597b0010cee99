"""DeepSparse behind the `Engine` interface: a sparse-aware CPU engine compiled for one batch size.

DeepSparse 1.8 overrides the leading dimension of every input with `batch_size` (fixed or not;
`Engine` has checked that the graph allows it). Its default scheduler runs requests from several
threads one after another, so `num_streams` > 1 selects the multi-stream scheduler; DeepSparse caps
the streams at `num_cores` and `self.num_streams` reports the capped value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .engine_base import Engine
from .errors import EngineLoadError, EngineUnavailableError, first_line

# DeepSparse 1.8 runs a weight about this sparse or sparser with its sparse kernels, which return wrong
# numbers (no error) when the weight's reduction width is not a multiple of 16 (a sliced Linear's
# input count often is not); such weights are refused, with advice on slicing to a multiple of 16.
SPARSE_KERNEL_SPARSITY = 0.4
SPARSE_KERNEL_WIDTH = 16


def misaligned_sparse_weights(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm weights DeepSparse would run sparse at a reduction width it gets wrong."""
    initializers = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if initializers[node.input[1]].data_location == onnx.TensorProto.EXTERNAL:
            continue  # weights kept outside the file are not loaded here; DeepSparse reads them itself
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.ndim != 2 or weight.size == 0:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        width = weight.shape[1] if node.op_type == "Gemm" and trans_b else weight.shape[0]
        sparsity = 1.0 - np.count_nonzero(weight) / weight.size
        if sparsity >= SPARSE_KERNEL_SPARSITY and width % SPARSE_KERNEL_WIDTH:
            found.append(f"{node.name or node.input[1]} ({width} inputs, {sparsity:.0%} sparse)")
    return found


SLICING_PASSES = {"vtp-slice": "DimensionSlicePass", "head-channel-slice": "HeadChannelSlicePass"}


def slicing_advice(recipe_path: Path) -> str:
    """How to re-slice: the slicing passes the artifact's recipe.json records, with their multiple (or
    both passes by name when there is no readable recipe)."""
    try:
        passes = json.loads(recipe_path.read_text(encoding="utf-8")).get("passes") or []
        used = [(SLICING_PASSES[p["name"]], p.get("params", {}).get("multiple")) for p in passes
                if isinstance(p, dict) and p.get("name") in SLICING_PASSES]
    except (OSError, ValueError, AttributeError, TypeError):
        used = []
    fix = "or use onnxruntime"
    if not used:
        return (f"Slice with multiple={SPARSE_KERNEL_WIDTH} (DimensionSlicePass or HeadChannelSlicePass) "
                f"before masking, {fix}")
    made = ", ".join(f"{name}(multiple={multiple})" for name, multiple in used)
    return (f"The widths come from {made} in {recipe_path.name}: run it with multiple={SPARSE_KERNEL_WIDTH} "
            f"before masking, {fix}")


class DeepSparseEngine(Engine):
    """deepsparse.Engine(model, batch_size, num_cores, num_streams) with clear errors."""

    name = "deepsparse"

    def _load(self, model: onnx.ModelProto) -> None:
        try:
            import deepsparse
        except ImportError as exc:  # installed but broken (e.g. a numpy 2 it cannot load)
            raise EngineUnavailableError(f"DeepSparse cannot be imported here: {exc}") from exc
        misaligned = misaligned_sparse_weights(model)
        if misaligned:
            raise EngineLoadError(
                f"DeepSparse 1.8 computes wrong results for sparse weights whose input width is not a "
                f"multiple of {SPARSE_KERNEL_WIDTH}; {self.model_path} has {len(misaligned)}: "
                f"{', '.join(misaligned[:4])}. {slicing_advice(self.model_path.parent / 'recipe.json')}")
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
