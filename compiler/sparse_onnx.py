"""The export rewrite for vitsparse's own sparse kernels: pruned MatMuls become SparseLinear nodes.

A MatMul reading a constant weight with enough zeros (and the bias Add after it) becomes one
`com.vitsparse::SparseLinear` node whose weight is stored as the kernels read it, row by row of Wᵀ:
- `f32_csr`: float32, unstructured (row offsets, input channel per non-zero, values);
- `bf16_1x2`: float weights rounded to bfloat16 in 1×2 blocks (what one vdpbf16ps lane multiplies);
- `int8_1x4`: an INT8 (QDQ) layer's codes in 1×4 blocks along the input channel (row offsets, block
  per non-zero block, 4 codes each, per-row code sums), with the input's QuantizeLinear folded into
  the node's attributes and the input and weight scales into one per-row scale.
An INT8 MLP (fc1 → its output Q/DQ → bias and an elementwise activation → fc2) then becomes one
`com.vitsparse::SparseMLP` node: the activation is evaluated onto a table of 256 codes per hidden
channel, and one kernel runs both layers with the hidden activations kept in cache. Then an INT8 node
followed by the block's residual Add (after proj's output Q/DQ and the bias, or after the MLP's bias)
takes all of them in: the residual becomes an input the kernels add where they write the output. Last,
an INT8 qkv node writes attention's q, kᵀ and v in the layout the attention reads (sparse_heads.py),
an INT8 proj node reads attention's output head by head (sparse_heads_input.py), and an INT8 node after
a LayerNorm computes the LayerNorm itself where it quantizes x (sparse_norms.py).
Only OpenVINO with vitsparse's extension (the `openvino-sparse` engine) runs such a file; the
reference ops below (numpy) are what export verification and the kernel tests compare against.
Layers below `min_sparsity` stay dense MatMuls, since the dense kernels win there (kernel_crossover.py
has the measured crossovers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from onnx.reference.op_run import OpRun

from .quantized_onnx import QuantizedOnnxError, _attribute, _bias_of, _Graph, _operands, _topological_sort

DOMAIN = "com.vitsparse"
OP_TYPE = "SparseLinear"
MLP_OP_TYPE = "SparseMLP"
BLOCK = 4  # input channels per INT8 block: the pruners' 1x4 pattern and one vpdpbusd lane


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


def quantize_u8(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """uint8 codes (as int64) of x as OpenVINO and the kernels quantize: x × (1 / scale) rounded half to
    even, plus the zero point, saturated (ONNX's QuantizeLinear divides, which differs on rare near-ties)."""
    inverse = np.float32(1) / np.float32(scale)
    return np.clip(np.rint(np.asarray(x, np.float32) * inverse) + zero_point, 0, 255).astype(np.int64)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> np.ndarray:
    """torch's LayerNorm over the last axis, in float32: what a kernel node with `norm_epsilon` reads x
    through."""
    x = np.asarray(x, np.float32)
    centered = x - x.mean(axis=-1, keepdims=True, dtype=np.float32)
    variance = (centered * centered).mean(axis=-1, keepdims=True, dtype=np.float32)
    return (centered / np.sqrt(variance + np.float32(epsilon)) * gamma + beta).astype(np.float32)


def sparse_linear(x: np.ndarray, packed: PackedWeight, act_scale: float = 1.0, act_zero_point: int = 0,
                  out_scale: float = 0.0, out_zero_point: int = 0, int8_output: bool = False,
                  norm: tuple[np.ndarray, np.ndarray, float] | None = None) -> np.ndarray:
    """What a SparseLinear node computes, in numpy: the reference for export checks and kernel tests.
    INT8 reads x through `norm` (gamma, beta, epsilon; `layer_norm`) if given, quantizes it
    (`quantize_u8`), sums exactly, scales, and with `out_scale` > 0 fake-quantizes the result to uint8
    before adding the bias; with `int8_output`, returns the int8 codes of the biased result instead
    (the uint8 ones minus 128)."""
    if norm is not None:
        x = layer_norm(x, *norm)
    dense = unpack(packed)
    if packed.format == "f32_csr":
        return (x.astype(np.float32) @ dense.T + packed.arrays[3]).astype(np.float32)
    if packed.format == "bf16_1x2":  # x rounded to bfloat16; products exact, sums in float64
        rounded = from_bf16_bits(to_bf16_bits(x)).astype(np.float64)
        return (rounded @ dense.T.astype(np.float64) + packed.arrays[3]).astype(np.float32)
    row_sums, scale, bias = packed.arrays[3:]
    codes = quantize_u8(x, act_scale, act_zero_point)
    sums = (codes - act_zero_point).astype(np.float64) @ dense.T.astype(np.float64)  # exact below 2^53
    value = sums.astype(np.float32) * scale
    if int8_output:
        return (quantize_u8(value + bias, out_scale, out_zero_point) - 128).astype(np.int8)
    if out_scale > 0:
        steps = quantize_u8(value, out_scale, out_zero_point) - out_zero_point
        value = steps.astype(np.float32) * np.float32(out_scale)
    return (value + bias).astype(np.float32)


def sparse_mlp(x: np.ndarray, fc1: PackedWeight, table: np.ndarray, fc2: PackedWeight, act_scale: float,
               act_zero_point: int, fc1_out_scale: float, fc1_out_zero_point: int, hidden_zero_point: int,
               out_scale: float = 0.0, out_zero_point: int = 0,
               norm: tuple[np.ndarray, np.ndarray, float] | None = None) -> np.ndarray:
    """What a SparseMLP node computes, in numpy: fc1 (no bias) over x (through `norm` if given)
    quantized to codes with its output quantization, table[channel, code] as the hidden codes, then
    fc2 over those codes."""
    unbiased = PackedWeight(fc1.format, fc1.rows, fc1.cols, (*fc1.arrays[:5], np.zeros(fc1.rows, np.float32)))
    raw = sparse_linear(x, unbiased, act_scale, act_zero_point, norm=norm)
    codes = quantize_u8(raw, fc1_out_scale, fc1_out_zero_point)
    hidden = np.asarray(table)[np.arange(fc1.rows), codes].astype(np.int64) - hidden_zero_point
    # codes minus the zero point, read back by fc2 with scale 1 and that zero point: the codes themselves
    return sparse_linear(hidden.astype(np.float32), fc2, 1.0, hidden_zero_point, out_scale, out_zero_point)


def split_heads(y: np.ndarray, heads: int) -> np.ndarray:
    """qkv's output y [batch, tokens, 3 × heads × head_dim] as a SparseLinear node with `heads` writes it:
    y's shape, holding for part, batch item and head in turn the head's q or v (tokens × head_dim) or
    kᵀ (head_dim × tokens), what a Reshape to [3, batch, heads, tokens, head_dim] reads."""
    batch, tokens, rows = y.shape
    parts = y.reshape(batch, tokens, 3, heads, rows // (3 * heads)).transpose(2, 0, 3, 1, 4)
    laid = [parts[0], parts[1].transpose(0, 1, 3, 2), parts[2]]
    return np.stack([p.reshape(batch, heads, -1) for p in laid]).reshape(y.shape)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """Attention's output [batch, heads, tokens, head_dim] as proj reads it, [batch, tokens, heads ×
    head_dim]: the rows a SparseLinear node with `x_heads` reads."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


# the arrays of each format, in the order a node reads them after x
WEIGHT_PARTS = {"f32_csr": ("row_ptr", "col", "values", "bias"),
                "bf16_1x2": ("row_ptr", "block_col", "values", "bias"),
                "int8_1x4": ("row_ptr", "block_col", "values", "row_sums", "scale", "bias")}


# inputs of a node without an addend: x and the weight's arrays; SparseMLP: x, fc1's arrays but its bias,
# the table, fc2's arrays
LINEAR_INPUTS = {fmt: 1 + len(parts) for fmt, parts in WEIGHT_PARTS.items()}
MLP_INPUTS = 1 + 2 * len(WEIGHT_PARTS["int8_1x4"])


def _norm_inputs(arrays: tuple[np.ndarray, ...], epsilon: float):
    """A node's inputs after its weight: (gamma, beta, epsilon) of its LayerNorm where it has one (else
    None), and the rest (its addend, if any)."""
    if not epsilon:
        return None, arrays
    return (arrays[0], arrays[1], float(epsilon)), arrays[2:]


def _plus(y: np.ndarray, addend: tuple[np.ndarray, ...]) -> np.ndarray:
    """y plus a node's optional addend input (the residual an INT8 node adds to its output)."""
    return (y + addend[0]).astype(np.float32) if addend else y


def _initializers(prefix: str, packed: PackedWeight, count: int | None = None) -> list[onnx.TensorProto]:
    """The first `count` (default all) arrays of a packed weight as initializers named prefix.part."""
    return [onnx.numpy_helper.from_array(array, f"{prefix}.{part}")
            for part, array in list(zip(WEIGHT_PARTS[packed.format], packed.arrays, strict=True))[:count]]


def make_node(name: str, x: str, output: str, packed: PackedWeight, act_scale: float = 1.0,
              act_zero_point: int = 0) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A SparseLinear node reading `x` and its weight initializers (named after `name`)."""
    inits = _initializers(name, packed)
    attributes = {"format": packed.format, "in_features": packed.cols}
    if packed.format == "int8_1x4":
        attributes.update(act_scale=float(act_scale), act_zero_point=int(act_zero_point))
    node = helper.make_node(OP_TYPE, [x, *(init.name for init in inits)], [output], name, domain=DOMAIN,
                            **attributes)
    return node, inits


def make_mlp_node(name: str, x: str, output: str, fc1: PackedWeight, table: np.ndarray, fc2: PackedWeight,
                  attributes: dict) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A SparseMLP node: `attributes` are sparse_mlp's keywords after fc2 (act_scale and on)."""
    inits = [*_initializers(f"{name}.fc1", fc1, 5),
             onnx.numpy_helper.from_array(np.ascontiguousarray(table, np.uint8), f"{name}.table"),
             *_initializers(f"{name}.fc2", fc2)]
    node = helper.make_node(MLP_OP_TYPE, [x, *(init.name for init in inits)], [output], name, domain=DOMAIN,
                            in_features=fc1.cols, **attributes)
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


def _uint8_zero_point(zero_point: np.ndarray) -> int:
    """A per-tensor zero point as uint8 codes count it (an int8 grid is the uint8 one shifted by 128)."""
    return int(zero_point.reshape(())) + (128 if zero_point.dtype == np.int8 else 0)


def _output_quantizer(g: _Graph, output: str):
    """(QuantizeLinear, DequantizeLinear, (scale, uint8 zero point)) when `output` is only read by a
    per-tensor Q whose only reader is the DQ with the same parameters, else None."""
    quantize = g.single_reader(output, "QuantizeLinear")
    dequantize = None if quantize is None else g.single_reader(quantize.output[0], "DequantizeLinear")
    if dequantize is None or len(quantize.input) < 3:
        return None
    scale, zero_point = g.constant(quantize.input[1]), g.constant(quantize.input[2])
    if (scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1
            or list(dequantize.input[1:3]) != list(quantize.input[1:3])):
        return None
    return quantize, dequantize, (float(scale.reshape(())), _uint8_zero_point(zero_point))


def _replacement(g: _Graph, node: onnx.NodeProto, min_sparsity: float, precision: str,
                 int8_min_sparsity: float):
    """(SparseLinear node, initializers, nodes it replaces) for a sparse enough MatMul, else None."""
    ops = _operands(g, node.input[0], node.input[1])
    if ops is not None:  # a QDQ layer: x → Q → DQ → MatMul(·, DQ(codes))
        quantize = g.produced_by(ops.input_codes, "QuantizeLinear")
        zero_point = g.constant(ops.input_zero_point)
        if (ops.weight.ndim != 2 or np.any(ops.weight_zero_point) or zero_point is None
                or zero_point.size != 1 or block_sparsity(ops.weight.T) < int8_min_sparsity):
            return None
        act_zero_point = _uint8_zero_point(zero_point)
        x, scale = quantize.input[0], ops.input_scale * ops.weight_scale
    else:
        weight = g.constant(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return None
        zeros = 1.0 - np.count_nonzero(weight) / weight.size
        if (block_sparsity(weight.T, 2) if precision == "bf16" else zeros) < min_sparsity:
            return None
        x = node.input[0]
    # An INT8 layer's output quantizer (Q → DQ, and the bias Add after it) stays in the graph, though the
    # kernels could apply both: OpenVINO reads that quantizer to run the attention MatMuls after qkv in
    # INT8 (folded into the node, DeiT-S at batch 16 ran 14 % slower).
    output, removed, bias = node.output[0], [node], None
    found = _bias_of(g, node.output[0])
    columns = (ops.weight if ops is not None else weight).shape[1]
    if found is not None and found[1].shape == (columns,):
        output, removed, bias = found[0].output[0], [node, found[0]], found[1]
    name = f"{(node.name or node.output[0]).strip('/').replace('/', '_')}_sparse"  # outputs are unique
    if ops is not None:
        packed = pack_int8_blocks(np.ascontiguousarray(ops.weight.T), scale, bias)
        new, inits = make_node(name, x, output, packed, ops.input_scale, act_zero_point)
    else:
        pack = pack_bf16_pairs if precision == "bf16" else pack_f32_csr
        new, inits = make_node(name, x, output, pack(np.ascontiguousarray(weight.T), bias))
    return new, inits, removed


# elementwise operations an MLP's activation may be made of: they are evaluated onto SparseMLP's table
ACTIVATION_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Relu", "Neg", "Exp",
                            "Gelu", "HardSigmoid", "HardSwish", "Clip"})


@dataclass
class _MlpMatch:
    """An INT8 MLP in a graph: fc1 → its output Q → DQ → elementwise activation → fc2 [→ Q → DQ]."""

    fc1: onnx.NodeProto
    fc1_quant: tuple[float, int]  # fc1's output scale and uint8 zero point
    source: str  # the DQ's output, the activation's input
    activation: list[onnx.NodeProto]  # source to fc2's input, bias Add included, in graph order
    fc2: onnx.NodeProto
    out_quant: tuple[float, int]  # fc2's output quantization, (0, 0) when it has none
    replaced: list[onnx.NodeProto]  # every node the SparseMLP node replaces
    output: str


def _activation_of(g: _Graph, end: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """(its one non-constant source tensor, its nodes in graph order) when `end` is an elementwise
    function of one tensor (every other input constant, nothing outside reading the tensors between)."""
    chain: dict[int, onnx.NodeProto] = {}
    sources, pending = set(), [end]
    while pending:
        name = pending.pop()
        node = g.producer.get(name)
        if node is None or node.op_type not in ACTIVATION_OPS or len(node.output) != 1 or len(chain) > 32:
            sources.add(name)
        elif id(node) not in chain:
            chain[id(node)] = node
            pending.extend(i for i in node.input if i and g.constant(i) is None)
    if len(sources) != 1 or not chain:
        return None
    for node in chain.values():
        if node.output[0] != end and any(id(r) not in chain for r in g.consumers.get(node.output[0], [])):
            return None
    return sources.pop(), [n for n in g.graph.node if id(n) in chain]


def _match_mlp(g: _Graph, fc2: onnx.NodeProto) -> _MlpMatch | None:
    """The INT8 MLP that ends in SparseLinear `fc2`, or None."""
    found = _activation_of(g, fc2.input[0])
    if found is None or len(g.consumers.get(fc2.input[0], [])) != 1:
        return None
    source, activation = found
    dequantize = g.produced_by(source, "DequantizeLinear")
    quantize = g.produced_by(dequantize.input[0], "QuantizeLinear") if dequantize is not None else None
    fc1 = g.produced_by(quantize.input[0], OP_TYPE) if quantize is not None else None
    quantizer = _output_quantizer(g, fc1.output[0]) if fc1 is not None else None
    formats = {_attribute(fc1, "format"), _attribute(fc2, "format")} if fc1 is not None else set()
    # the fused kernel quantizes fc1's sums without a bias: a bias folded into fc1 (added before its
    # output quantization) would be lost
    if (quantizer is None or quantizer[1].output[0] != source or formats != {"int8_1x4"}
            or np.any(g.constant(fc1.input[6]))
            or any(id(r) not in {id(n) for n in activation} for r in g.consumers.get(source, []))):
        return None
    replaced, output, out_quant = [fc1, quantize, dequantize, *activation, fc2], fc2.output[0], (0.0, 0)
    after = _output_quantizer(g, fc2.output[0])
    if after is not None:
        replaced.extend(after[:2])
        output, out_quant = after[1].output[0], after[2]
    return _MlpMatch(fc1, quantizer[2], source, activation, fc2, out_quant, replaced, output)


def _activation_table(g: _Graph, match: _MlpMatch) -> np.ndarray | None:
    """SparseMLP's table: for every hidden channel and fc1 output code, the fc2 input code that the
    activation gives for fc1's dequantized output (evaluated with onnx's reference); None when the
    activation is not one function per channel."""
    from onnx.reference import ReferenceEvaluator

    scale, zero_point = match.fc1_quant
    rows = int(g.constant(match.fc1.input[1]).size - 1)
    grid = (np.arange(256, dtype=np.float32) - zero_point) * np.float32(scale)
    values = np.ascontiguousarray(np.repeat(grid[:, None], rows, axis=1))
    constants = sorted({i for n in match.activation for i in n.input if i and g.constant(i) is not None})
    graph = helper.make_graph(
        match.activation, "activation",
        [helper.make_tensor_value_info(match.source, onnx.TensorProto.FLOAT, values.shape)],
        [helper.make_tensor_value_info(match.fc2.input[0], onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(g.constant(i), i) for i in constants])
    opsets = [o for o in g.model.opset_import if o.domain in ("", "ai.onnx")]
    evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets))
    hidden = evaluator.run(None, {match.source: values})[0]
    if hidden.size != values.size:  # a constant that varies along another axis than the channels
        return None
    hidden, fc2 = hidden.reshape(values.shape), match.fc2
    codes = quantize_u8(hidden, _attribute(fc2, "act_scale"), _attribute(fc2, "act_zero_point"))
    return np.ascontiguousarray(codes.T.astype(np.uint8))


def _packed_of(g: _Graph, node: onnx.NodeProto) -> PackedWeight:
    """The packed INT8 weight an int8_1x4 SparseLinear node reads."""
    arrays = tuple(g.constant(i) for i in node.input[1:])
    return PackedWeight("int8_1x4", arrays[0].size - 1, _attribute(node, "in_features"), arrays)


def _next_mlp(g: _Graph, skip: set[str]) -> _MlpMatch | None:
    """The first INT8 MLP in graph order whose fc2 is not named in `skip`."""
    for node in g.graph.node:
        if node.op_type == OP_TYPE and node.name not in skip:
            match = _match_mlp(g, node)
            if match is not None:
                return match
    return None


def _fuse_mlps(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each INT8 MLP (`_MlpMatch`) into one SparseMLP node; returns how many."""
    fused, skip = 0, set()
    while (match := _next_mlp(g := _Graph(model), skip)) is not None:
        table = _activation_table(g, match)
        if table is None:
            skip.add(match.fc2.name)
            continue
        fc1, fc2 = match.fc1, match.fc2
        attributes = dict(act_scale=_attribute(fc1, "act_scale"),
                          act_zero_point=_attribute(fc1, "act_zero_point"),
                          fc1_out_scale=match.fc1_quant[0], fc1_out_zero_point=match.fc1_quant[1],
                          hidden_zero_point=_attribute(fc2, "act_zero_point"),
                          out_scale=match.out_quant[0], out_zero_point=match.out_quant[1])
        name = fc1.name.removesuffix("_sparse") + "_mlp_sparse"
        node, inits = make_mlp_node(name, fc1.input[0], match.output, _packed_of(g, fc1),
                                    table, _packed_of(g, fc2), attributes)
        for old in match.replaced:
            g.graph.node.remove(old)
        g.graph.node.append(node)
        g.graph.initializer.extend(inits)
        fused += 1
    return fused


@dataclass
class _ResidualMatch:
    """An INT8 kernel node's output chain: [Q → DQ] → [Add bias] → Add(residual), each tensor read once."""

    node: onnx.NodeProto
    quant: tuple[float, int] | None  # the output quantizer's scale and uint8 zero point, if folded here
    bias: np.ndarray | None
    residual: str
    replaced: list[onnx.NodeProto]
    output: str


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape ONNX's shape inference fixes, by name (the graph before the rewrite)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph  # Shape → Reshape chains too
    shapes = {}
    for info in [*inferred.value_info, *inferred.input, *inferred.output]:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def _match_residual(g: _Graph, node: onnx.NodeProto, shapes: dict) -> _ResidualMatch | None:
    """The chain after an INT8 SparseLinear (its output quantizer, bias and residual Add) or after a
    SparseMLP (bias and residual Add), when the residual has the output's shape."""
    quant, replaced, end = None, [], node.output[0]
    if node.op_type == OP_TYPE:
        if _attribute(node, "format") != "int8_1x4" or len(node.input) != LINEAR_INPUTS["int8_1x4"] \
                or _attribute(node, "out_scale"):
            return None
        found = _output_quantizer(g, end)
        if found is not None and np.any(g.constant(node.input[-1])):
            return None  # the kernels fake-quantize before the bias, this graph after it
        if found is not None:
            quant, replaced, end = found[2], [found[0], found[1]], found[1].output[0]
    elif node.op_type != MLP_OP_TYPE or len(node.input) != MLP_INPUTS:
        return None
    rows, bias = g.constant(node.input[-1]).size, _bias_of(g, end)  # the node's own bias: one per row
    if bias is not None and bias[1].size == rows and bias[1].shape[-1:] == (rows,):  # (192,) or (1, 1, 192)
        replaced, end = [*replaced, bias[0]], bias[0].output[0]
    else:
        bias = None
    add = g.single_reader(end, "Add")
    if add is None:
        return None
    residual = add.input[1] if add.input[0] == end else add.input[0]
    shape = shapes.get(add.output[0])
    same = shape is not None and shape == shapes.get(residual) == shapes.get(end)
    if residual == end or g.constant(residual) is not None or not same:
        return None  # y + y, and a constant or broadcast addend, stay an Add
    return _ResidualMatch(node, quant, None if bias is None else bias[1].reshape(rows), residual,
                          [*replaced, add], add.output[0])


def _fuse_residuals(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Fold, in place, each INT8 kernel node's output chain (`_ResidualMatch`) into the node: the
    quantizer into out_scale/out_zero_point, the bias into its bias, the residual as an added input
    the kernels add where they write the output. Returns how many nodes took one in."""
    g = _Graph(model)
    matches = [m for n in list(g.graph.node) if (m := _match_residual(g, n, shapes)) is not None]
    for match in matches:
        node = match.node
        if match.quant is not None:
            node.attribute.extend([helper.make_attribute("out_scale", float(match.quant[0])),
                                   helper.make_attribute("out_zero_point", int(match.quant[1]))])
        if match.bias is not None:
            bias = node.input[-1]
            g.set_constant(bias, (g.constant(bias) + match.bias).astype(np.float32))
        node.input.append(match.residual)
        node.output[0] = match.output
        for old in match.replaced:
            g.graph.node.remove(old)
    return len(matches)


def to_sparse_kernels(model: onnx.ModelProto, min_sparsity: float, precision: str = "f32",
                      int8_min_sparsity: float | None = None) -> int:
    """Rewrite, in place, every MatMul whose constant weight has at least `min_sparsity` zeros (float in
    `precision` "bf16": all-zero pairs) or, INT8, `int8_min_sparsity` all-zero 1×4 blocks (None: the
    same) into a SparseLinear node; returns how many were rewritten."""
    shapes = _static_shapes(model)
    g = _Graph(model)
    rewritten = 0
    for node in [n for n in g.graph.node if n.op_type == "MatMul"]:
        found = _replacement(g, node, min_sparsity, precision,
                             min_sparsity if int8_min_sparsity is None else int8_min_sparsity)
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
        _Graph(model).prune()  # the input QuantizeLinears the nodes replaced would block the fusion
        if _fuse_mlps(model):
            _topological_sort(model.graph)
            _Graph(model).prune()
        from .sparse_heads import fuse_attention_heads  # (these import this module)
        from .sparse_heads_input import read_heads_input
        from .sparse_norms import fuse_layer_norms

        if _fuse_residuals(model, shapes) + fuse_attention_heads(model, shapes):
            _topological_sort(model.graph)
        if fuse_layer_norms(model, shapes) + read_heads_input(model, shapes):
            _Graph(model).prune()
    return rewritten


class SparseLinear(OpRun):
    """onnx's reference evaluator for com.vitsparse::SparseLinear (register with new_ops)."""

    op_domain = DOMAIN

    def _run(self, x, *arrays, format=None, in_features=None, act_scale=1.0, act_zero_point=0,  # noqa: A002
             out_scale=0.0, out_zero_point=0, heads=0, int8_output=0, norm_epsilon=0.0, x_heads=0):
        count = len(WEIGHT_PARTS[format])  # an INT8 node may read more: its LayerNorm's, its addend
        packed = PackedWeight(format, int(arrays[0].size - 1), int(in_features), tuple(arrays[:count]))
        norm, rest = _norm_inputs(arrays[count:], norm_epsilon)
        x = merge_heads(x) if x_heads else x
        y = sparse_linear(x, packed, act_scale, act_zero_point, out_scale, out_zero_point, bool(int8_output),
                          norm)
        y = _plus(y, rest)
        return (split_heads(y, heads) if heads else y,)


class SparseMLP(OpRun):
    """onnx's reference evaluator for com.vitsparse::SparseMLP (register with new_ops)."""

    op_domain = DOMAIN

    def _run(self, x, *arrays, in_features=None, act_scale=1.0, act_zero_point=0, fc1_out_scale=1.0,
             fc1_out_zero_point=0, hidden_zero_point=0, out_scale=0.0, out_zero_point=0, norm_epsilon=0.0):
        fc1 = PackedWeight("int8_1x4", int(arrays[0].size - 1), int(in_features), tuple(arrays[:5]))
        table = arrays[5].reshape(fc1.rows, 256)
        fc2 = PackedWeight("int8_1x4", int(arrays[6].size - 1), fc1.rows, tuple(arrays[6:12]))
        norm, rest = _norm_inputs(arrays[MLP_INPUTS - 1:], norm_epsilon)
        y = sparse_mlp(x, fc1, table, fc2, act_scale, act_zero_point, fc1_out_scale, fc1_out_zero_point,
                       hidden_zero_point, out_scale, out_zero_point, norm)
        return (_plus(y, rest),)
