"""OpenVINO with vitsparse's sparse kernels: the deployable engine for pruned weights, on any Python.

A file exported with `ExportConfig(sparse_kernels=True)` holds SparseLinear nodes for its pruned
linears; the extension built by `make install` runs them with vitsparse's kernels and OpenVINO runs
the rest of the graph as the `openvino` engine would (same hints, INT8 and bf16 included). With the bf16
hint the INT8 kernel nodes read and write bfloat16, as the nodes around them do. A file without such
nodes runs exactly as on `openvino`. Loading warns where a node has fewer zeros than this
CPU's crossover: the export chose by the CPU it ran on, and dense OpenVINO runs such a layer faster here.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import onnx

from .kernel_crossover import default_min_sparsity
from .kernel_nodes import INT8_FORMAT, LINEAR_OP, MLP_OP, KernelLayer, below_crossover, kernel_layers
from .openvino_engine import OpenVinoEngine, _import_openvino
from .sparse_extension import add_extension


class KernelCrossoverWarning(UserWarning):
    """A file's sparse-kernel nodes include layers that dense OpenVINO would run faster on this CPU."""


def crossover_message(slow: list[KernelLayer], total: int) -> str:
    """What KernelCrossoverWarning says about `slow`, `total` kernel products in all."""
    shares = sorted(layer.zero_share for layer in slow if layer.zero_share is not None)
    low, high = f"{shares[0]:.0%}", f"{shares[-1]:.0%}"
    span = low if low == high else f"{low}-{high}"
    crossovers = ", ".join(f"{precision} {default_min_sparsity(precision):.0%}"
                           for precision in sorted({layer.precision for layer in slow if layer.precision}))
    names = ", ".join(layer.name for layer in slow[:3]) + (", ..." if len(slow) > 3 else "")
    return (f"{len(slow)} of the file's {total} sparse-kernel products have {span} zeros, below"
            f" this CPU's crossover ({crossovers}), where dense OpenVINO runs faster: {names}. "
            f"The export chose by the CPU it ran on: export on this kind of CPU, or with a higher "
            f"sparse_min_sparsity, to keep those layers dense.")


def _outside_runtime() -> int:
    """The `stacklevel` of the first caller outside this package, so that a warning names the user's line
    (create_engine, the engine's constructor and its loading steps all live here)."""
    package, level = Path(__file__).parent, 2  # 1 is the function that calls warnings.warn
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).parent == package:
        frame, level = frame.f_back, level + 1
    return level


def bf16_kernel_io(network) -> int:
    """Puts Converts around each INT8 kernel node of an openvino.Model, so that it reads x and its addend
    and writes y as bf16 (a node that writes int8 codes keeps them); returns how many nodes. Under the
    bf16 hint OpenVINO computes the nodes around them in bf16, and a node that reads and writes f32 gets
    a Reorder on each side (DeiT-S at batch 1: 2.7 ms of 9.6). OpenVINO drops the Converts, which then
    convert bf16 to bf16. Where a neighbour already converts between bf16 and f32 (a bf16 model input or
    output), the node reads or feeds the bf16 side directly: OpenVINO keeps such a pair of Converts as a
    copy."""
    openvino = _import_openvino()
    opset, f32, bf16 = openvino.opset13, openvino.Type.f32, openvino.Type.bf16
    count = 0
    for node in network.get_ordered_ops():
        if not _is_int8_kernel(node):
            continue
        for port in node.inputs():  # x and the addend: the inputs that are not the weight's constants
            source = port.get_source_output()
            if source.get_node().get_type_name() != "Constant" and source.get_element_type() == f32:
                bf16_source = _converted_from(source, bf16)
                if bf16_source is None:
                    bf16_source = opset.convert(source, "bf16").output(0)
                port.replace_source_output(bf16_source)
        node.validate_and_infer_types()
        count += 1
        if node.output(0).get_element_type() != bf16:  # int8 codes (int8_output) stay as they are
            continue
        back = None
        for reader in list(node.output(0).get_target_inputs()):
            narrowing = reader.get_node()
            if narrowing.get_type_name() == "Convert" and narrowing.output(0).get_element_type() == bf16:
                for target in list(narrowing.output(0).get_target_inputs()):
                    target.replace_source_output(node.output(0))
                continue
            if back is None:
                back = opset.convert(node.output(0), "f32").output(0)
            reader.replace_source_output(back)
    if count:
        network.validate_nodes_and_infer_types()
    return count


def _converted_from(output, element_type):
    """The input of the Convert that produced `output` when that input has `element_type`, else None."""
    node = output.get_node()
    if node.get_type_name() != "Convert":
        return None
    source = node.input(0).get_source_output()
    return source if source.get_element_type() == element_type else None


def _is_int8_kernel(node) -> bool:
    kind = node.get_type_name()
    return kind == MLP_OP or (kind == LINEAR_OP and node.get_attributes().get("format") == INT8_FORMAT)


class OpenVinoSparseEngine(OpenVinoEngine):
    """OpenVinoEngine whose Core has vitsparse's extension loaded."""

    name = "openvino-sparse"
    below_crossover: list[KernelLayer] = []  # set by loading: the products dense OpenVINO runs faster here

    def _core(self):
        core = _import_openvino().Core()
        add_extension(core)
        return core

    def _prepare(self, network) -> None:
        if (self.precision or "f32") == "bf16":
            bf16_kernel_io(network)

    def _load(self, model: onnx.ModelProto) -> None:
        super()._load(model)
        self.below_crossover = below_crossover(model.graph)
        if self.below_crossover:
            total = sum(len(layers) for layers in kernel_layers(model.graph).values())
            message = crossover_message(self.below_crossover, total)
            warnings.warn(KernelCrossoverWarning(message), stacklevel=_outside_runtime())
