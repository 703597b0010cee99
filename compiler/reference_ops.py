"""Faster numpy versions of onnx reference ops, for verifying exports at real batch sizes.

onnx's reference Conv loops in Python, its Erf calls math.erf per element and its Pow is a general
power even for LayerNorm's square, which makes verifying a real batch of a ViT slow. These
keep the reference semantics: the Conv fast path covers only non-overlapping patches (stride equal
to the kernel, no padding, dilation or groups) and defers everything else to onnx's own code.
The integer ops (INT8 exports) multiply in float64, which BLAS runs and which holds every
UINT8×INT8 sum exactly (|sum| < 2^53), where onnx's integer matmul loops without BLAS.

QuantizeLinear and DequantizeLinear are here because onnx ≥ 1.15 (the only onnx on Python ≥ 3.12)
implements them only from opset 19 while the exporter writes opset 14; one implementation of the
opset-13 semantics on every onnx version keeps an export's tolerance meaning the same everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import Conv as OnnxConv
from onnx.reference.ops.op_conv_integer import ConvInteger as OnnxConvInteger
from onnx.reference.ops.op_erf import Erf as OnnxErf
from onnx.reference.ops.op_matmul_integer import MatMulInteger as OnnxMatMulInteger
from onnx.reference.ops.op_pow import Pow as OnnxPow

# ReferenceEvaluator(new_ops=...) replaces an op by the class named like it, hence these names


def _patch_conv(X, W, auto_pad, dilations, group, pads, strides) -> np.ndarray | None:  # noqa: N803
    """Conv over non-overlapping patches as one einsum; None when the conv is not of that kind."""
    kernel = tuple(W.shape[2:])
    plain = (group in (None, 1) and not any(pads or ()) and auto_pad in (None, "NOTSET")
             and all(d == 1 for d in dilations or (1,)))
    if (not plain or X.ndim != 4 or tuple(strides or ()) != kernel
            or X.shape[2] % kernel[0] or X.shape[3] % kernel[1]):
        return None
    batch, channels, height, width = X.shape
    patches = X.reshape(batch, channels, height // kernel[0], kernel[0], width // kernel[1], kernel[1])
    return np.einsum("bcyixj,ocij->boyx", patches, W, optimize=True)


class Conv(OnnxConv):
    """Conv as one einsum over non-overlapping patches (a ViT patch embedding); else onnx's Conv."""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
             strides=None):  # noqa: N803 - onnx's argument names
        out = _patch_conv(X, W, auto_pad, dilations, group, pads, strides)
        if out is None:
            return super()._run(X, W, B, auto_pad, dilations, group, kernel_shape, pads, strides)
        if B is not None:
            out = out + B.reshape(1, -1, 1, 1)
        return (out.astype(X.dtype),)


class Erf(OnnxErf):
    """Erf over the whole array at once."""

    def _run(self, x):  # type: ignore[override]
        return (torch.special.erf(torch.from_numpy(np.ascontiguousarray(x))).numpy().astype(x.dtype),)


def _centred(values: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """values − zero point in float64; a per-channel zero point lies along `axis`."""
    centred = values.astype(np.float64)
    if zero_point is None:
        return centred
    zero_point = np.asarray(zero_point, dtype=np.float64)
    if zero_point.ndim == 1 and zero_point.size > 1:
        shape = [1] * values.ndim
        shape[axis] = zero_point.size
        zero_point = zero_point.reshape(shape)
    return centred - zero_point


class Pow(OnnxPow):
    """x ** 2 (LayerNorm's variance) as x * x, which rounds the same; every other exponent as onnx does."""

    def _run(self, a, b):  # type: ignore[override]
        if np.ndim(b) == 0 and float(b) == 2.0 and np.issubdtype(a.dtype, np.floating):
            return (np.square(a),)
        return super()._run(a, b)


class MatMulInteger(OnnxMatMulInteger):
    """(A − a_zero_point) @ (B − b_zero_point) in float64, returned as INT32."""

    def _run(self, A, B, a_zero_point=None, b_zero_point=None):  # type: ignore[override]  # noqa: N803
        product = np.matmul(_centred(A, a_zero_point, -2), _centred(B, b_zero_point, -1))
        return (np.rint(product).astype(np.int32),)


class ConvInteger(OnnxConvInteger):
    """The fast Conv on zero-point-centred float64 operands, returned as INT32."""

    def _run(self, X, W, x_zero_point=None, w_zero_point=None, auto_pad=None, dilations=None,  # noqa: N803
             group=None, kernel_shape=None, pads=None, strides=None):  # type: ignore[override]
        out = _patch_conv(_centred(X, x_zero_point, 1), _centred(W, w_zero_point, 0), auto_pad, dilations,
                          group, pads, strides)
        if out is None:
            return super()._run(X, W, x_zero_point, w_zero_point, auto_pad, dilations, group, kernel_shape,
                                pads, strides)
        return (np.rint(out).astype(np.int32),)


def _along_axis(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A scale or zero point shaped to broadcast over an `ndim` tensor: a per-axis (1-D) one along
    `axis` (ONNX's default 1), a scalar as it is."""
    param = np.asarray(param)
    if param.ndim != 1 or ndim == 0:
        return param
    shape = [1] * ndim
    shape[(1 if axis is None else axis) % ndim] = param.size
    return param.reshape(shape)


class QuantizeLinear(OpRun):
    """y = saturate(round_half_to_even(x / y_scale) + y_zero_point), in the zero point's type (UINT8
    without one), per tensor or along `axis`."""

    def _run(self, x, y_scale, y_zero_point=None, axis=None, **_ignored):  # type: ignore[override]
        quantized = np.rint(x / _along_axis(y_scale, x.ndim, axis))
        dtype = np.uint8 if y_zero_point is None else np.asarray(y_zero_point).dtype
        if y_zero_point is not None:
            quantized = quantized + _along_axis(y_zero_point, x.ndim, axis).astype(quantized.dtype)
        limits = np.iinfo(dtype)
        return (np.clip(quantized, limits.min, limits.max).astype(dtype),)


class DequantizeLinear(OpRun):
    """y = (x − x_zero_point) · x_scale in float32, per tensor or along `axis`."""

    def _run(self, x, x_scale, x_zero_point=None, axis=None, **_ignored):  # type: ignore[override]
        centred = x.astype(np.float32)
        if x_zero_point is not None:
            centred = centred - _along_axis(x_zero_point, x.ndim, axis).astype(np.float32)
        return ((centred * _along_axis(x_scale, x.ndim, axis)).astype(np.float32),)


FAST_REFERENCE_OPS = [Conv, ConvInteger, DequantizeLinear, Erf, MatMulInteger, Pow, QuantizeLinear]
