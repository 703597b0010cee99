"""The export rewrite for vitsparse's own sparse kernels: pruned MatMuls become SparseLinear nodes.

A MatMul reading a constant weight with enough zeros (and the bias Add after it) becomes one
`com.vitsparse::SparseLinear` node whose weight is stored as the kernels read it, row by row of Wᵀ:
- `f32_csr`: float32, unstructured (row offsets, input channel per non-zero, values);
- `bf16_1x2`: float weights rounded to bfloat16 in 1×2 blocks (what one vdpbf16ps lane multiplies);
- `int8_1x4`: an INT8 (QDQ) layer's codes in 1×4 blocks along the input channel (row offsets, block
  per non-zero block, 4 codes each, per-row code sums), with the input's QuantizeLinear folded into
  the node's attributes and the input and weight scales into one per-row scale.
Only OpenVINO with vitsparse's extension (the `openvino-sparse` engine) runs such a file; the
reference op below (numpy) is what export verification and the kernel tests compare against.
Layers below `min_sparsity` stay dense MatMuls, since the dense kernels win there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from onnx.reference.op_run import OpRun

from .quantized_onnx import QuantizedOnnxError, _bias_of, _Graph, _operands, _topological_sort

DOMAIN = "com.vitsparse"
OP_TYPE = "SparseLinear"
BLOCK = 4  # input channels per INT8 block: the pruners' 1x4 pattern and one vpdpbusd lane
# below this share of zeros (INT8: of all-zero blocks) OpenVINO's dense MatMul wins on DeiT-S's shapes
# (the crossover `python -m vitsparse.bench.kernel_speed` reports), so such layers stay dense
DEFAULT_MIN_SPARSITY = 0.75


@dataclass(frozen=True)
class PackedWeight:
    """A sparse weight in the kernels' layout; `arrays` are the node's inputs after x, in order."""

    format: str
    rows: int
    cols: int
    arrays: tuple[np.ndarray, ...]


def _keep_one(row_idx: np.ndarray, col_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries to store; an all-zero weight keeps its first (zero) entry, since OpenVINO's ONNX
    reader turns an empty initializer into a scalar."""
    if row_idx.size:
        return row_idx, col_idx
    return np.zeros(1, np.int64), np.zeros(1, np.int64)


def pack_f32_csr(weight: np.ndarray, bias: np.ndarray | None = None) -> PackedWeight:
    """Rows of `weight` ([out, in]) as CSR: row offsets, input channel and value of every non-zero."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    row_idx, col_idx = _keep_one(*np.nonzero(weight))
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_idx, minlength=rows))]).astype(np.int32)
    bias = np.zeros(rows, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(rows)
    return PackedWeight("f32_csr", rows, cols,
                        (row_ptr, col_idx.astype(np.int32), weight[row_idx, col_idx], bias))


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as vcvtneps2bf16 does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_bf16_pairs(weight: np.ndarray, bias: np.ndarray | None = None) -> PackedWeight:
    """Rows of `weight` ([out, in]) rounded to bfloat16 in 1×2 blocks along the input channel: row
    offsets, block index, the block's 2 values as one int32 (bfloat16 bits, the first channel's in the
    low half: OpenVINO's ONNX reader widens 16-bit integers), bias. Pairs of zeros are left out."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    pairs = in_blocks(weight, 2)
    row_idx, pair_idx = _keep_one(*np.nonzero(pairs.any(axis=2)))
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_idx, minlength=rows))]).astype(np.int32)
    bias = np.zeros(rows, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(rows)
    values = to_bf16_bits(pairs[row_idx, pair_idx]).view(np.int32).reshape(-1)
    return PackedWeight("bf16_1x2", rows, cols, (row_ptr, pair_idx.astype(np.int32), values, bias))


def pack_int8_blocks(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None) -> PackedWeight:
    """INT8 `codes` ([out, in]) in 1×4 blocks: row offsets, block index, 4 codes per block, per-row sums
    of the codes, per-row `scale` (input × weight scale) and bias. Blocks of four zeros are left out."""
    codes = np.asarray(codes)
    if codes.dtype != np.int8:
        raise QuantizedOnnxError(f"INT8 blocks need int8 codes, got {codes.dtype}")
    rows, cols = codes.shape
    blocks = in_blocks(codes, BLOCK)
    row_idx, block_idx = _keep_one(*np.nonzero(blocks.any(axis=2)))
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_idx, minlength=rows))]).astype(np.int32)
    row_sums = codes.astype(np.int32).sum(axis=1).astype(np.int32)
    scale = np.broadcast_to(np.asarray(scale, np.float32), (rows,)).copy()
    bias = np.zeros(rows, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(rows)
    values = blocks[row_idx, block_idx].reshape(-1)
    return PackedWeight("int8_1x4", rows, cols,
                        (row_ptr, block_idx.astype(np.int32), values, row_sums, scale, bias))


def unpack(packed: PackedWeight) -> np.ndarray:
    """The dense [out, in] weight (INT8 codes as int8) a packed weight stores."""
    row_ptr, index, values = packed.arrays[:3]
    rows = np.repeat(np.arange(packed.rows), np.diff(row_ptr))
    if packed.format == "f32_csr":
        dense = np.zeros((packed.rows, packed.cols), np.float32)
        dense[rows, index] = values
        return dense
    if packed.format == "bf16_1x2":
        pairs = np.zeros((packed.rows, -(-packed.cols // 2), 2), np.float32)
        pairs[rows, index] = from_bf16_bits(np.ascontiguousarray(values).view(np.uint16)).reshape(-1, 2)
        return pairs.reshape(packed.rows, -1)[:, :packed.cols]
    blocks = np.zeros((packed.rows, -(-packed.cols // BLOCK), BLOCK), np.int8)
    blocks[rows, index] = values.reshape(-1, BLOCK)
    return blocks.reshape(packed.rows, -1)[:, :packed.cols]


def sparse_linear(x: np.ndarray, packed: PackedWeight, act_scale: float = 1.0, act_zero_point: int = 0
                  ) -> np.ndarray:
    """What a SparseLinear node computes, in numpy: the reference for export checks and kernel tests.
    INT8 quantizes x as OpenVINO does, x × (1 / scale) rounded half to even and saturated to uint8 (ONNX's
    QuantizeLinear divides, which differs on rare near-ties), then sums exactly."""
    dense = unpack(packed)
    if packed.format == "f32_csr":
        return (x.astype(np.float32) @ dense.T + packed.arrays[3]).astype(np.float32)
    if packed.format == "bf16_1x2":  # x rounded to bfloat16; products exact, sums in float64
        rounded = from_bf16_bits(to_bf16_bits(x)).astype(np.float64)
        return (rounded @ dense.T.astype(np.float64) + packed.arrays[3]).astype(np.float32)
    row_sums, scale, bias = packed.arrays[3:]
    inverse = np.float32(1) / np.float32(act_scale)
    codes = np.clip(np.rint(x.astype(np.float32) * inverse) + act_zero_point, 0, 255)
    sums = (codes - act_zero_point).astype(np.float64) @ dense.T.astype(np.float64)  # exact below 2^53
    return (sums.astype(np.float32) * scale + bias).astype(np.float32)


def make_node(name: str, x: str, output: str, packed: PackedWeight, act_scale: float = 1.0,
              act_zero_point: int = 0) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A SparseLinear node reading `x` and its weight initializers (named after `name`)."""
    parts = {"f32_csr": ("row_ptr", "col", "values", "bias"),
             "bf16_1x2": ("row_ptr", "block_col", "values", "bias"),
             "int8_1x4": ("row_ptr", "block_col", "values", "row_sums", "scale", "bias")}[packed.format]
    inits = [onnx.numpy_helper.from_array(array, f"{name}.{part}")
             for part, array in zip(parts, packed.arrays, strict=True)]
    attributes = {"format": packed.format, "in_features": packed.cols}
    if packed.format == "int8_1x4":
        attributes.update(act_scale=float(act_scale), act_zero_point=int(act_zero_point))
    node = helper.make_node(OP_TYPE, [x, *(init.name for init in inits)], [output], name, domain=DOMAIN,
                            **attributes)
    return node, inits


def in_blocks(weight: np.ndarray, width: int) -> np.ndarray:
    """An [out, in] weight as [out, blocks, width]: 1×width blocks along the input channel, the last
    one padded with zeros."""
    rows, cols = weight.shape
    padded = np.zeros((rows, -(-cols // width) * width), weight.dtype)
    padded[:, :cols] = weight
    return padded.reshape(rows, -1, width)


def block_sparsity(weight: np.ndarray, width: int = BLOCK) -> float:
    """Share of all-zero 1×width blocks along the input channel of an [out, in] weight."""
    return 1.0 - float(in_blocks(weight, width).any(axis=2).mean())


def _replacement(g: _Graph, node: onnx.NodeProto, min_sparsity: float, precision: str):
    """(SparseLinear node, initializers, nodes it replaces) for a sparse enough MatMul, else None."""
    ops = _operands(g, node.input[0], node.input[1])
    if ops is not None:  # a QDQ layer: x → Q → DQ → MatMul(·, DQ(codes))
        quantize = g.produced_by(ops.input_codes, "QuantizeLinear")
        zero_point = g.constant(ops.input_zero_point)
        if (ops.weight.ndim != 2 or np.any(ops.weight_zero_point) or zero_point is None
                or zero_point.size != 1 or block_sparsity(ops.weight.T) < min_sparsity):
            return None
        act_zero_point = int(zero_point.reshape(())) + (128 if zero_point.dtype == np.int8 else 0)
        x, scale = quantize.input[0], ops.input_scale * ops.weight_scale
    else:
        weight = g.constant(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return None
        zeros = 1.0 - np.count_nonzero(weight) / weight.size
        if (block_sparsity(weight.T, 2) if precision == "bf16" else zeros) < min_sparsity:
            return None
        x = node.input[0]
    output, removed, bias = node.output[0], [node], None
    found = _bias_of(g, node.output[0])
    columns = (ops.weight if ops is not None else weight).shape[1]
    if found is not None and found[1].shape == (columns,):
        output, removed, bias = found[0].output[0], [node, found[0]], found[1]
    name = f"{(node.name or 'matmul').strip('/').replace('/', '_')}_sparse"
    if ops is not None:
        packed = pack_int8_blocks(np.ascontiguousarray(ops.weight.T), scale, bias)
        new, inits = make_node(name, x, output, packed, ops.input_scale, act_zero_point)
    else:
        pack = pack_bf16_pairs if precision == "bf16" else pack_f32_csr
        new, inits = make_node(name, x, output, pack(np.ascontiguousarray(weight.T), bias))
    return new, inits, removed


def to_sparse_kernels(model: onnx.ModelProto, min_sparsity: float, precision: str = "f32") -> int:
    """Rewrite, in place, every MatMul whose constant weight has at least `min_sparsity` zeros (INT8:
    all-zero 1×4 blocks; float in `precision` "bf16": all-zero pairs) into a SparseLinear node; returns
    how many were rewritten."""
    g = _Graph(model)
    rewritten = 0
    for node in [n for n in g.graph.node if n.op_type == "MatMul"]:
        found = _replacement(g, node, min_sparsity, precision)
        if found is None:
            continue
        new, inits, removed = found
        for old in removed:
            g.graph.node.remove(old)
        g.graph.node.append(new)
        g.graph.initializer.extend(inits)
        rewritten += 1
    if rewritten:
        if not any(entry.domain == DOMAIN for entry in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        _topological_sort(model.graph)
        _Graph(model).prune()
    return rewritten


class SparseLinear(OpRun):
    """onnx's reference evaluator for com.vitsparse::SparseLinear (register with new_ops)."""

    op_domain = DOMAIN

    def _run(self, x, *arrays, format=None, in_features=None, act_scale=1.0, act_zero_point=0):  # noqa: A002
        packed = PackedWeight(format, int(arrays[0].size - 1), int(in_features), tuple(arrays))
        return (sparse_linear(x, packed, act_scale, act_zero_point),)
