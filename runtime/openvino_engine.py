"""OpenVINO behind the `Engine` interface: the dense CPU engine most users would pick instead of a sparse one.

The model is read from the ONNX file, its batch dimension set to `batch_size`, and compiled for the
CPU with a precision hint: `f32`, also when None is given, or `bf16` where the CPU has bf16
instructions, only when asked (OpenVINO's own choice would be bf16 on such CPUs, so one artifact
would give other numbers on another CPU than the ones its export verified). An INT8 (QDQ) file runs
its quantized layers in INT8 whatever the hint: the hint sets the precision of the float parts. One
stream is the latency mode; num_streams > 1 is the throughput mode with that many streams, each call
taking an idle infer request, so several threads can run at once.

`int8_mac_share` reads the compiled (executed) graph: each MatMul/Gemm/Conv node of the file is found
in the `originalLayersNames` of the operation that runs it, and its MACs count as INT8 when that
operation's `runtimePrecision` is u8 or i8 (a quantized layer whose dequantization OpenVINO could not
fuse runs as f32 and shows up here). A sparse-kernel node's products (openvino-sparse) count as INT8
when its kernel is, whatever precision OpenVINO reports for the custom operation.
"""

from __future__ import annotations

import queue
import re

import numpy as np
import onnx

from .engine_base import Engine
from .errors import EngineLoadError, EngineUnavailableError, UnsupportedPrecisionError, first_line
from .onnx_sparsity import LayerMacs, layer_macs

DEVICE = "CPU"
INT8_PRECISIONS = ("u8", "i8")  # runtimePrecision values of an operation computing in 8-bit integers
# precision name -> (OpenVINO's hint value, the CPU capability it needs, or None)
PRECISION_HINTS: dict[str, tuple[str, str | None]] = {"f32": ("f32", None), "bf16": ("bf16", "BF16")}
# OpenVINO pins a compiled model's threads to cores by default on Linux. With several compiled models in
# one process (a side-by-side timing, a server with replicas), a model's speed then depends on which
# model ran before it, in two distinct modes; unpinned, every call runs at the fast one.
UNPINNED = {"ENABLE_CPU_PINNING": False}


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise EngineUnavailableError(f"OpenVINO cannot be imported here: {exc}") from exc
    return openvino


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of this CPU (e.g. FP32, INT8, BF16)."""
    return tuple(_import_openvino().Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def check_cpu_precision(precision: str | None, capabilities: tuple[str, ...]) -> None:
    """UnsupportedPrecisionError when `precision` needs an instruction set missing from `capabilities`."""
    needed = PRECISION_HINTS[precision][1] if precision in PRECISION_HINTS else None
    if needed and needed not in capabilities:
        raise UnsupportedPrecisionError(f"this CPU cannot run OpenVINO in {precision}: it has no {needed} "
                                        f"instructions (OpenVINO reports {', '.join(capabilities)}); "
                                        f"use precision 'f32'")


class OpenVinoEngine(Engine):
    """openvino.Core().compile_model(model, 'CPU', hints) with clear errors."""

    name = "openvino"
    precisions = tuple(PRECISION_HINTS)

    @classmethod
    def check_precision(cls, precision: str | None) -> None:
        """Also refuse a precision this CPU has no instructions for (bf16 without AVX-512 BF16 or AMX)."""
        super().check_precision(precision)
        if precision not in (None, "f32"):
            check_cpu_precision(precision, cpu_capabilities())

    def _core(self):
        """The openvino.Core the model is read and compiled with."""
        return _import_openvino().Core()

    def _load(self, model: onnx.ModelProto) -> None:
        core = self._core()
        try:
            network = core.read_model(str(self.model_path))
            network.reshape({port: _batched(port.get_partial_shape(), self.batch_size)
                             for port in network.inputs})
            self._prepare(network)
            self._compiled = core.compile_model(network, DEVICE, self._config())
        except Exception as exc:  # OpenVINO raises RuntimeError with the plugin's message
            reason = openvino_reason(exc)
            raise EngineLoadError(f"OpenVINO could not compile {self.model_path}: {reason}") from exc
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.num_streams):
            self._requests.put(self._compiled.create_infer_request())
        self._effective = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def _prepare(self, network) -> None:
        """Changes to the read openvino.Model before it is compiled: none here."""

    def _config(self) -> dict[str, object]:
        """The compile hints: precision, latency (one stream) or throughput mode, thread count, no pinning."""
        config: dict[str, object] = {}
        config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[self.precision or "f32"][0]
        if self.num_streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        else:
            config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=str(self.num_streams))
        if self.num_cores:
            config["INFERENCE_NUM_THREADS"] = self.num_cores
        config.update(UNPINNED)
        return config

    @property
    def effective_precision(self) -> str:
        """What OpenVINO compiled the float layers for."""
        return self._effective

    @property
    def int8_mac_share(self) -> float | None:
        """Share of the file's MatMul/Gemm/Conv MACs (at the compiled batch size) that ran in INT8."""
        if not hasattr(self, "_int8_share"):
            layers = layer_macs(self.model_path)
            self._int8_share = int8_share(layers, executed_precisions(self._compiled))
        return self._int8_share

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        request = self._requests.get()  # blocks while every stream's request is busy
        try:
            results = request.infer(dict(enumerate(inputs)))
            return [np.array(results[port]) for port in self._compiled.outputs]
        finally:
            self._requests.put(request)


# the lines of an OpenVINO error that say where it was raised rather than what is wrong
_OPENVINO_TRACE = re.compile(r"^(Exception from |Check '.*' failed at |While validating |FrontEnd API failed|"
                             r"Model wasn't fully converted|Summary:|\[ GENERAL_ERROR \]$|"
                             r".* with a message:$)")


def openvino_reason(exc: BaseException) -> str:
    """The line of an OpenVINO exception that says what is wrong (its first lines say where)."""
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("-- ")
        if line and not _OPENVINO_TRACE.match(line):
            return line
    return first_line(exc)


def _batched(shape, batch_size: int):
    """`shape` (an OpenVINO PartialShape) with its leading dimension set to batch_size."""
    import openvino

    dims = list(shape)
    if dims:
        dims[0] = openvino.Dimension(batch_size)
    return openvino.PartialShape(dims)


def executed_precisions(compiled) -> dict[str, str]:
    """Each original layer name (an ONNX node's name) -> the runtimePrecision of the executed operation
    it was fused into, from a compiled model's runtime graph."""
    found: dict[str, str] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" not in info or "runtimePrecision" not in info:
            continue
        precision = info["runtimePrecision"].astype(str)
        for name in info["originalLayersNames"].astype(str).split(","):
            if name:
                found[name] = precision
    return found


def int8_share(layers: list[LayerMacs], precisions: dict[str, str]) -> float | None:
    """MACs of the layers whose executed precision is INT8 (or whose sparse kernel is) over all layers'
    MACs; a layer missing from `precisions` counts as not INT8. None when no layer has known MACs."""
    total = sum(layer.macs or 0 for layer in layers)
    if not total:
        return None
    int8 = sum(layer.macs or 0 for layer in layers
               if layer.int8_kernel or precisions.get(layer.name) in INT8_PRECISIONS)
    return int8 / total
