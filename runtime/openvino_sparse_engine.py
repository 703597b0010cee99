"""OpenVINO with vitsparse's sparse kernels: the deployable engine for pruned weights, on any Python.

A file exported with `ExportConfig(sparse_kernels=True)` holds SparseLinear nodes for its pruned
linears; the extension built by `make install` runs them with vitsparse's kernels and OpenVINO runs
the rest of the graph as the `openvino` engine would (same hints, INT8 and bf16 included). A file
without such nodes runs exactly as on `openvino`.
"""

from __future__ import annotations

from .openvino_engine import OpenVinoEngine, _import_openvino
from .sparse_extension import add_extension


class OpenVinoSparseEngine(OpenVinoEngine):
    """OpenVinoEngine whose Core has vitsparse's extension loaded."""

    name = "openvino-sparse"

    def _core(self):
        core = _import_openvino().Core()
        add_extension(core)
        return core
