"""Which INT8 form an ONNX file is in, and refusing an engine that would not run it as INT8.

`qdq`: QuantizeLinear/DequantizeLinear pairs around float ops (ONNX Runtime fuses them into its
integer kernels). `operator`: MatMulInteger/ConvInteger (or QLinear*) ops, the only INT8 form
DeepSparse accelerates; a QDQ file runs there in float, partly outside its runtime.
"""

from __future__ import annotations

import onnx

from .errors import EngineLoadError

INTEGER_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}

# why an engine is refused a format, as said to the user
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("deepsparse", "qdq"): "DeepSparse has no INT8 kernels for QDQ files (it runs them in float, "
                           "partly outside its runtime); export with ExportConfig(quant_format='operator') "
                           "(a recipe file: int8_format: operator)",
    ("onnxruntime", "operator"): "ONNX Runtime's UINT8×INT8 MatMulInteger saturates its 16-bit sums on "
                                 "CPUs without VNNI (wrong results, measured on AVX2); run the QDQ export "
                                 "(a recipe file: int8_format: qdq, the default)",
}


def quantization_format(model: onnx.ModelProto) -> str | None:
    """'operator', 'qdq', or None for a float model."""
    ops = {node.op_type for node in model.graph.node}
    if ops & INTEGER_OPS:
        return "operator"
    return "qdq" if "DequantizeLinear" in ops else None


def check_int8_support(engine: str, model: onnx.ModelProto, path: object) -> None:
    """EngineLoadError when `engine` cannot run `model`'s INT8 form as INT8."""
    form = quantization_format(model)
    reason = UNSUPPORTED.get((engine, form)) if form else None
    if reason:
        raise EngineLoadError(f"{path} is INT8 in the {form} format: {reason}")
