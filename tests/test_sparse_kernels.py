"""vitsparse's sparse kernels (kernels/, run through OpenVINO as SparseLinear and SparseMLP nodes): every
instruction-set path against the numpy reference over random shapes and the edge cases, malformed nodes
refused with a clear error, and pruned ViTs exported with sparse kernels matching torch on
`openvino-sparse`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from vitsparse.bench.kernel_speed import dense_int8_model, qdq_mlp_model, save_layer_model
from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, fold_for_export, trace
from vitsparse.compiler.sparse_onnx import (
    SparseLinear,
    SparseMLP,
    from_bf16_bits,
    layer_norm,
    make_mlp_node,
    make_node,
    merge_heads,
    pack_bf16_pairs,
    pack_f32_csr,
    pack_int8_blocks,
    quantize_u8,
    sparse_linear,
    sparse_mlp,
    split_heads,
    to_bf16_bits,
    to_sparse_kernels,
    unpack,
)
from vitsparse.pruners import MagnitudePass, QuantConfig, QuantizePass, SparsityConfig
from vitsparse.runtime import (
    EngineLoadError,
    EngineUnavailableError,
    UnsupportedPrecisionError,
    check_engine_spec,
    create_engine,
    engine_status,
    inspect_onnx,
    kernel_crossover,
)
from vitsparse.runtime.openvino_sparse_engine import KernelCrossoverWarning, bf16_kernel_io
from vitsparse.runtime.sparse_extension import ENV_DIR, ENV_ISA, LIBRARY, add_extension

from helpers import small_vit

STATUS = engine_status("openvino-sparse")
# CI builds the extension with `make install`: there a missing library is a failure, not a skip
pytestmark = pytest.mark.skipif(not STATUS.available and os.environ.get("CI") != "true", reason=STATUS.reason)
ISAS = ("avx512", "avxvnni", "avx2", "scalar")  # a path the CPU lacks runs the next one down: still checked
F32_RTOL = 1e-5  # of the output's largest magnitude: float sums in another order
INT8_ATOL = 1e-3  # integer sums are exact; the rescale is one FMA or a multiply and an add


@pytest.fixture(scope="module")
def core():
    import openvino

    core = openvino.Core()
    add_extension(core)
    return core


def _layer_file(path, packed, x_shape, **attributes) -> str:
    node, inits = make_node("layer", "x", "y", packed, **attributes)
    save_layer_model([node], inits, x_shape, packed.rows, path)
    return str(path)


def _run(core, path: str, x: np.ndarray, isa: str, monkeypatch, **inputs: np.ndarray) -> np.ndarray:
    monkeypatch.setenv(ENV_ISA, isa)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
    compiled = core.compile_model(path, "CPU", config)
    return compiled({"x": x, **inputs})[0]


def _with_addend(path: str, shape: list[int], **attributes) -> str:
    """The one-node file at `path` with a float input "r" of `shape` as its node's addend (and these
    attributes added to the node)."""
    model = onnx.load(path)
    model.graph.node[0].input.append("r")
    model.graph.node[0].attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attributes.items())
    model.graph.input.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, shape))
    onnx.save(model, path)
    return path


def _block_codes(rng, rows: int, cols: int, sparsity: float) -> np.ndarray:
    codes = rng.integers(-128, 128, (rows, cols)).astype(np.int8)
    keep = rng.random((rows, -(-cols // 4))) >= sparsity
    return (codes * np.repeat(keep, 4, axis=1)[:, :cols]).astype(np.int8)


# (rows of x, in features, out features, sparsity): ViT-like, K not a multiple of 4 or 16, N = 1,
# more rows than one panel, an all-zero weight, a dense one, one output channel, wide inputs, and enough
# rows for a panel per task (uneven panels; panels narrowed for a row stride of 2 KiB)
SHAPES = [(197, 64, 48, 0.9), (5, 10, 7, 0.5), (1, 13, 17, 0.0), (300, 37, 33, 0.75), (33, 64, 20, 1.0),
          (16, 16, 1, 0.3), (129, 130, 19, 0.6), (40, 1000, 24, 0.8), (3, 777, 5, 0.97), (515, 42, 48, 0.9),
          (600, 24, 512, 0.8)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{s[0]}-k{s[1]}-m{s[2]}-s{s[3]}" for s in SHAPES])
def test_int8_kernel_matches_numpy(core, tmp_path, monkeypatch, isa, shape) -> None:
    n, k, m, sparsity = shape
    rng = np.random.default_rng(n * 1000 + k)
    codes = _block_codes(rng, m, k, sparsity)
    scale, bias = rng.random(m).astype(np.float32) * 0.01, rng.standard_normal(m).astype(np.float32)
    packed = pack_int8_blocks(codes, scale, bias)
    x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    path = _layer_file(tmp_path / "l.onnx", packed, [n, k], act_scale=0.04, act_zero_point=120)
    got = _run(core, path, x, isa, monkeypatch)
    np.testing.assert_allclose(got, sparse_linear(x, packed, 0.04, 120), atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{s[0]}-k{s[1]}-m{s[2]}-s{s[3]}" for s in SHAPES])
def test_int8_kernel_adds_its_addend_after_the_bias(core, tmp_path, monkeypatch, isa, shape) -> None:
    """The residual an INT8 node takes in: every output element gets its own addend element, after the
    output quantizer (half the shapes have one) and the bias."""
    n, k, m, sparsity = shape
    rng = np.random.default_rng(n * 1000 + k + 1)
    codes = _block_codes(rng, m, k, sparsity)
    scale, bias = rng.random(m).astype(np.float32) * 0.01, rng.standard_normal(m).astype(np.float32)
    packed = pack_int8_blocks(codes, scale, bias)
    out = {"out_scale": 0.02, "out_zero_point": 128} if SHAPES.index(shape) % 2 else {}
    x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    addend = (rng.standard_normal((n, m)) * 10).astype(np.float32)
    path = _layer_file(tmp_path / "l.onnx", packed, [n, k], act_scale=0.04, act_zero_point=120)
    path = _with_addend(path, [n, m], **out)
    got = _run(core, path, x, isa, monkeypatch, r=addend)
    expected = sparse_linear(x, packed, 0.04, 120, **out) + addend
    np.testing.assert_allclose(got, expected, atol=INT8_ATOL, rtol=0)


# (batch, tokens, in features, heads, head dim): DeiT's 197 tokens in several panels, batch items
# meeting inside a panel, fewer tokens than a tile, N = 1, K not a multiple of 4, three heads; and
# enough tiles (74) for AVX-512's own panels a thread, which it takes split into heads from 64 on 2 threads
HEADS_SHAPES = [(1, 197, 64, 2, 16), (3, 50, 37, 1, 32), (2, 5, 24, 2, 16), (1, 1, 16, 1, 16),
                (4, 70, 20, 3, 16), (6, 197, 24, 2, 16)]


def _heads_file(path, packed, x_shape, heads: int) -> str:
    """A one-node file whose INT8 node writes attention's q, kᵀ and v for `heads` heads."""
    node, inits = make_node("layer", "x", "y", packed, act_scale=0.04, act_zero_point=120)
    node.attribute.append(onnx.helper.make_attribute("heads", heads))
    save_layer_model([node], inits, x_shape, packed.rows, path)
    return str(path)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", HEADS_SHAPES, ids=["b{}-t{}-k{}-h{}x{}".format(*s) for s in HEADS_SHAPES])
def test_int8_kernel_split_into_heads_writes_q_kt_and_v(core, tmp_path, monkeypatch, isa, shape) -> None:
    """A qkv node with `heads` writes the plain product laid out head by head (q and v token-major,
    k transposed), on every path; onnx's reference evaluator computes the same."""
    batch, tokens, k, heads, head_dim = shape
    m = 3 * heads * head_dim
    rng = np.random.default_rng(tokens * 100 + k)
    codes = _block_codes(rng, m, k, 0.7)
    scale, bias = rng.random(m).astype(np.float32) * 0.01, rng.standard_normal(m).astype(np.float32)
    packed = pack_int8_blocks(codes, scale, bias)
    x = (rng.standard_normal((batch, tokens, k)) * 3).astype(np.float32)
    path = _heads_file(tmp_path / "l.onnx", packed, [batch, tokens, k], heads)
    expected = split_heads(sparse_linear(x, packed, 0.04, 120), heads)
    np.testing.assert_allclose(_run(core, path, x, isa, monkeypatch), expected, atol=INT8_ATOL, rtol=0)
    from onnx.reference import ReferenceEvaluator

    (reference,) = ReferenceEvaluator(path, new_ops=[SparseLinear]).run(None, {"x": x})
    np.testing.assert_allclose(reference, expected, atol=INT8_ATOL, rtol=0)


def _int8_output_file(path, packed, x_shape, heads: int, out_zero_point: int) -> str:
    """A one-node file whose INT8 node writes int8 codes (laid out head by head where heads > 0)."""
    node, inits = make_node("layer", "x", "y", packed, act_scale=0.04, act_zero_point=120)
    attributes = {"out_scale": 0.05, "out_zero_point": out_zero_point, "int8_output": 1, "heads": heads}
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attributes.items())
    save_layer_model([node], inits, x_shape, packed.rows, path, output_type=onnx.TensorProto.INT8)
    return str(path)


def _assert_codes_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """int8 codes equal, but for a rare step where the rounding of scale × sum + bias (one FMA, or a
    multiply and an add) meets a tie of the quantizer."""
    assert got.dtype == np.int8 and got.shape == expected.shape
    differ = got.astype(np.int32) - expected
    assert np.abs(differ).max(initial=0) <= 1 and np.count_nonzero(differ) <= max(1, differ.size // 1000)


# (rows of x or (batch, tokens), in features, heads, head dim or out features): row-major and head by head
CODE_SHAPES = [((197,), 64, 0, 48), ((1,), 13, 0, 17), ((600,), 24, 0, 512), ((1, 197), 64, 2, 16),
               ((3, 50), 37, 1, 32), ((2, 5), 24, 2, 16), ((6, 197), 24, 2, 16)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("read_bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", CODE_SHAPES, ids=["n{}-k{}-h{}-m{}".format("x".join(map(str, s[0])), *s[1:])
                                                    for s in CODE_SHAPES])
def test_int8_kernel_writes_int8_codes(core, tmp_path, monkeypatch, isa, read_bf16, shape) -> None:
    """With int8_output a node writes what QuantizeLinear to int8 writes of its result (zero point
    out_zero_point − 128), saturated at both ends, row-major or head by head, reading f32 or bf16 x, on
    every path; onnx's reference evaluator computes the same."""
    rows, k, heads, width = shape
    m = 3 * heads * width if heads else width
    rng = np.random.default_rng(m * 100 + k)
    packed = pack_int8_blocks(_block_codes(rng, m, k, 0.7), rng.random(m).astype(np.float32) * 0.01,
                              rng.standard_normal(m).astype(np.float32) * 3)
    x = (rng.standard_normal((*rows, k)) * 3).astype(np.float32)
    out_zero_point = 128 if heads else 100
    path = _int8_output_file(tmp_path / "l.onnx", packed, [*rows, k], heads, out_zero_point)
    if read_bf16:
        got, ran_in = _run_bf16(core, path, x, isa, monkeypatch)
        assert ran_in == {"bf16"}
        x = _bf16(x)
    else:
        got = _run(core, path, x, isa, monkeypatch)
    value = sparse_linear(x, packed, 0.04, 120)  # with the bias
    expected = quantize_u8(value, 0.05, out_zero_point) - 128
    assert expected.min() == -128 and expected.max() == 127  # saturated codes among them
    _assert_codes_equal(got, split_heads(expected, heads) if heads else expected)
    from onnx.reference import ReferenceEvaluator

    (reference,) = ReferenceEvaluator(path, new_ops=[SparseLinear]).run(None, {"x": x})
    _assert_codes_equal(reference, split_heads(expected, heads) if heads else expected)


# (batch, heads, tokens, head dim): AVX-512 reads heads of a multiple of 16 channels where they lie (DeiT's
# 6 × 64 over 197 tokens among them); narrower or odd heads, and the other paths, read a gathered copy
X_HEADS_SHAPES = [(2, 3, 5, 16), (1, 6, 197, 64), (2, 2, 7, 8), (3, 1, 1, 13)]
PROJ_QUANTIZATION = {"act_scale": 0.04, "act_zero_point": 120}
PROJ_OUTPUT = {"out_scale": 0.05, "out_zero_point": 110}


def _x_heads_file(path, packed, x_shape: list[int], x_heads: int) -> str:
    """A one-node file whose INT8 node, as proj (an output quantizer, the residual as addend "r"), reads
    x [batch, heads, tokens, head dim] head by head (x_heads) and writes y [batch, tokens, rows]."""
    batch, _, tokens, _ = x_shape
    node, inits = make_node("layer", "x", "y", packed, **PROJ_QUANTIZATION)
    node.attribute.append(onnx.helper.make_attribute("x_heads", x_heads))
    save_layer_model([node], inits, x_shape, packed.rows, path)
    model = onnx.load(str(path))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                      [batch, tokens, packed.rows]))
    onnx.save(model, str(path))
    return _with_addend(str(path), [batch, tokens, packed.rows], **PROJ_OUTPUT)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("read_bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", X_HEADS_SHAPES, ids=["b{}-h{}-t{}-d{}".format(*s) for s in X_HEADS_SHAPES])
def test_int8_kernel_reads_x_head_by_head(core, tmp_path, monkeypatch, isa, read_bf16, shape) -> None:
    """A node with x_heads reads attention's output [batch, heads, tokens, head dim] as the plain node
    reads it transposed to [batch, tokens, heads × head dim]: the same y on every path, from f32 or bf16
    x, and the numpy reference's; onnx's reference evaluator computes the same."""
    batch, heads, tokens, head_dim = shape
    k, m = heads * head_dim, 24
    rng = np.random.default_rng(k * 10 + tokens)
    packed = pack_int8_blocks(_block_codes(rng, m, k, 0.7), rng.random(m).astype(np.float32) * 0.01,
                              rng.standard_normal(m).astype(np.float32))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    addend = rng.standard_normal((batch, tokens, m)).astype(np.float32)
    path = _x_heads_file(tmp_path / "heads.onnx", packed, list(shape), heads)
    plain = _layer_file(tmp_path / "plain.onnx", packed, [batch, tokens, k], **PROJ_QUANTIZATION)
    plain = _with_addend(plain, [batch, tokens, m], **PROJ_OUTPUT)
    if read_bf16:
        got, ran_in = _run_bf16(core, path, x, isa, monkeypatch, r=addend)
        assert ran_in == {"bf16"}
        plain_got, _ = _run_bf16(core, plain, merge_heads(x), isa, monkeypatch, r=addend)
        np.testing.assert_array_equal(got, plain_got)
        return
    got = _run(core, path, x, isa, monkeypatch, r=addend)
    np.testing.assert_array_equal(got, _run(core, plain, merge_heads(x), isa, monkeypatch, r=addend))
    expected = sparse_linear(merge_heads(x), packed, **PROJ_QUANTIZATION, **PROJ_OUTPUT) + addend
    np.testing.assert_allclose(got, expected, atol=INT8_ATOL, rtol=0)
    from onnx.reference import ReferenceEvaluator

    (reference,) = ReferenceEvaluator(path, new_ops=[SparseLinear]).run(None, {"x": x, "r": addend})
    np.testing.assert_allclose(reference, expected, atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize(("case", "message"), [
    ("f32 weight", "only an int8_1x4 node reads x head by head"),
    ("3 heads of 16", "not 3 heads of equal width"),
    ("x of rank 3", "reads it as \\[batch, 2, tokens, 8\\]"), ("x of 4 heads", "reads it as"),
    ("split into heads too", "does not split its output"), ("with a LayerNorm", "does not normalize"),
])
def test_a_node_reading_heads_is_refused_where_it_cannot(tmp_path, case, message) -> None:
    rng = np.random.default_rng(5)
    heads = {"3 heads of 16": 3}.get(case, 2)
    x_shape = {"x of rank 3": [2, 5, 16], "x of 4 heads": [2, 4, 5, 4]}.get(case, [2, 2, 5, 8])
    rows = 48 if case == "split into heads too" else 8
    node, inits = make_node("layer", "x", "y", _small_weight(rng, rows, case == "f32 weight"), act_scale=0.1,
                            act_zero_point=0)
    node.attribute.append(onnx.helper.make_attribute("x_heads", heads))
    if case == "split into heads too":
        node.attribute.append(onnx.helper.make_attribute("heads", 1))
    if case == "with a LayerNorm":
        save_layer_model([node], inits, x_shape, rows, tmp_path / "l.onnx")
        _with_norm(str(tmp_path / "l.onnx"), 16, rng)
        _assert_refused(tmp_path / "l.onnx", message)
        return
    _assert_node_refused(tmp_path / "l.onnx", node, inits, x_shape, rows, message, False)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int8_output", [False, True], ids=["fake-quantized", "codes"])
def test_int8_outputs_round_half_to_even(core, tmp_path, monkeypatch, isa, int8_output) -> None:
    """A result halfway between two output steps goes to the even one, as QuantizeLinear rounds it, on
    every path: y = x's first channel (a weight of 1 there), out_scale 2, so every odd x is a tie."""
    k, m = 8, 16
    codes = np.zeros((m, k), np.int8)
    codes[:, 0] = 1
    packed = pack_int8_blocks(codes, np.ones(m, np.float32), np.zeros(m, np.float32))
    x = np.zeros((81, k), np.float32)
    x[:, 0] = np.arange(-40, 41)
    node, inits = make_node("layer", "x", "y", packed, act_scale=1.0, act_zero_point=128)
    attributes = {"out_scale": 2.0, "out_zero_point": 128, "int8_output": int(int8_output)}
    node.attribute.extend(onnx.helper.make_attribute(name, v) for name, v in attributes.items())
    save_layer_model([node], inits, [81, k], m, tmp_path / "l.onnx",
                     output_type=onnx.TensorProto.INT8 if int8_output else onnx.TensorProto.FLOAT)
    steps = np.repeat(np.round(x[:, :1] / 2), m, axis=1)  # numpy rounds half to even: -19.5 → -20
    assert list(steps[[0, 1, 21, 59], 0]) == [-20, -20, -10, 10]  # x = -40, -39, -19, 19
    got = _run(core, str(tmp_path / "l.onnx"), x, isa, monkeypatch)
    np.testing.assert_array_equal(got, steps.astype(np.int8) if int8_output else 2 * steps)


def test_split_heads_puts_each_element_where_attention_reads_it() -> None:
    """The layout itself, element by element: y[b, t, (part, head, d)] lands at q[b, h, t, d],
    kᵀ[b, h, d, t] and v[b, h, t, d] of a Reshape to [3, batch, heads, tokens, head_dim]."""
    batch, tokens, heads, head_dim = 2, 3, 2, 4
    y = np.arange(batch * tokens * 3 * heads * head_dim, dtype=np.float32).reshape(batch, tokens, -1)
    laid = split_heads(y, heads).reshape(3, batch, heads, tokens * head_dim)
    q, k, v = (laid[p].reshape(batch, heads, tokens, head_dim) for p in (0, 1, 2))
    k_t = laid[1].reshape(batch, heads, head_dim, tokens)
    for b, t, h, d in np.ndindex(batch, tokens, heads, head_dim):
        assert q[b, h, t, d] == y[b, t, h * head_dim + d]
        assert k_t[b, h, d, t] == y[b, t, (heads + h) * head_dim + d]
        assert v[b, h, t, d] == y[b, t, (2 * heads + h) * head_dim + d]
    assert not np.array_equal(k, k_t.transpose(0, 1, 3, 2))  # k's slab really is transposed


def _assert_refused(path, message: str) -> None:
    """openvino-sparse refuses the file at `path` with an error that says `message`."""
    with pytest.raises(EngineLoadError, match=message):
        create_engine("openvino-sparse", path, batch_size=2)


def _assert_node_refused(path, node, inits, x_shape: list[int], rows: int, message: str, with_addend: bool,
                         output_type: int = onnx.TensorProto.FLOAT) -> None:
    """The one-node file of `node` (with an addend input where `with_addend`) is refused with `message`."""
    save_layer_model([node], inits, x_shape, rows, path, output_type=output_type)
    if with_addend:
        _with_addend(str(path), [*x_shape[:-1], rows])
    _assert_refused(path, message)


def _small_weight(rng, rows: int, f32: bool) -> object:
    """A half-empty INT8 weight of `rows` × 16 (float32 CSR where `f32`), for the nodes the engine refuses."""
    if f32:
        return pack_f32_csr(rng.standard_normal((rows, 16)).astype(np.float32))
    return pack_int8_blocks(_block_codes(rng, rows, 16, 0.5), np.ones(rows, np.float32))


@pytest.mark.parametrize(("case", "message"), [
    ("f32 weight", "only an int8_1x4 node"), ("not 3 parts", "not 3 parts of 5 heads"),
    ("head of 8 channels", "multiple of 16"), ("with an addend", "takes no addend"),
    ("x of rank 2", "reads x as"),
])
def test_a_node_split_into_heads_is_refused_where_it_cannot_be(tmp_path, case, message) -> None:
    rng = np.random.default_rng(3)
    m, heads, x_shape = {"not 3 parts": (48, 5, [2, 3, 16]), "head of 8 channels": (24, 1, [2, 3, 16]),
                         "x of rank 2": (48, 1, [6, 16])}.get(case, (48, 1, [2, 3, 16]))
    node, inits = make_node("layer", "x", "y", _small_weight(rng, m, case == "f32 weight"), act_scale=0.1,
                            act_zero_point=0)
    node.attribute.append(onnx.helper.make_attribute("heads", heads))
    _assert_node_refused(tmp_path / "l.onnx", node, inits, x_shape, m, message, case == "with an addend")


@pytest.mark.parametrize(("case", "message"), [
    ("f32 weight", "only an int8_1x4 node writes int8"), ("no out_scale", "needs out_scale above 0"),
    ("with an addend", "takes no addend"), ("int8_output 2", "must be 0 or 1"),
])
def test_a_node_writing_int8_is_refused_where_it_cannot(tmp_path, case, message) -> None:
    rng = np.random.default_rng(4)
    node, inits = make_node("layer", "x", "y", _small_weight(rng, 8, case == "f32 weight"), act_scale=0.1,
                            act_zero_point=0)
    attributes = {"out_scale": 0.0 if case == "no out_scale" else 0.1, "out_zero_point": 128,
                  "int8_output": 2 if case == "int8_output 2" else 1}
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attributes.items())
    _assert_node_refused(tmp_path / "l.onnx", node, inits, [2, 16], 8, message, case == "with an addend",
                         onnx.TensorProto.INT8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{s[0]}-k{s[1]}-m{s[2]}-s{s[3]}" for s in SHAPES])
def test_f32_kernel_matches_numpy(core, tmp_path, monkeypatch, isa, shape) -> None:
    n, k, m, sparsity = shape
    rng = np.random.default_rng(n * 1000 + k + 1)
    weight = rng.standard_normal((m, k)).astype(np.float32) * (rng.random((m, k)) >= sparsity)
    packed = pack_f32_csr(weight, rng.standard_normal(m).astype(np.float32))
    x = rng.standard_normal((n, k)).astype(np.float32)
    got = _run(core, _layer_file(tmp_path / "l.onnx", packed, [n, k]), x, isa, monkeypatch)
    expected = sparse_linear(x, packed)
    np.testing.assert_allclose(got, expected, atol=F32_RTOL * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{s[0]}-k{s[1]}-m{s[2]}-s{s[3]}" for s in SHAPES])
def test_bf16_kernel_matches_numpy(core, tmp_path, monkeypatch, isa, shape) -> None:
    """bfloat16 products are exact in float32; only the order of the float32 sums differs."""
    n, k, m, sparsity = shape
    rng = np.random.default_rng(n * 1000 + k + 2)
    keep = np.repeat(rng.random((m, -(-k // 2))) >= sparsity, 2, axis=1)[:, :k]
    packed = pack_bf16_pairs(rng.standard_normal((m, k)).astype(np.float32) * keep,
                             rng.standard_normal(m).astype(np.float32))
    x = rng.standard_normal((n, k)).astype(np.float32)
    got = _run(core, _layer_file(tmp_path / "l.onnx", packed, [n, k]), x, isa, monkeypatch)
    expected = sparse_linear(x, packed)
    np.testing.assert_allclose(got, expected, atol=F32_RTOL * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_kernels_round_activations_half_to_even(core, tmp_path, monkeypatch, isa) -> None:
    """Through an identity weight, y is x rounded to bfloat16: ties go to the even neighbour (1 + 2^-8 to 1,
    1 + 3 × 2^-8 up to 1 + 2^-6), on every path, as vdpbf16ps's inputs are."""
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), -(1 + 3 * 2**-8)], np.float32)
    x = np.random.default_rng(7).standard_normal((20, 17)).astype(np.float32)  # 8-row tiles and a part
    x[:, :4] = ties * np.float32(2.0) ** np.arange(-10, 10, dtype=np.float32)[:, None]  # still ties, scaled
    packed = pack_bf16_pairs(np.eye(x.shape[1], dtype=np.float32))
    got = _run(core, _layer_file(tmp_path / "l.onnx", packed, list(x.shape)), x, isa, monkeypatch)
    expected = from_bf16_bits(to_bf16_bits(x))
    assert list(expected[10, :4]) == [1.0, 1 + 2**-6, -1.0, -(1 + 2**-6)]  # row 10: scale 1
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_sums_do_not_saturate(core, tmp_path, monkeypatch, isa) -> None:
    """Codes at the ends of their ranges: 255 × -128 four times per block, over 64 blocks, stays exact
    (16-bit pair sums, as vpmaddubsw makes, would clip at 32767)."""
    k = 256
    codes = np.full((8, k), -128, np.int8)
    codes[1::2] = 127
    packed = pack_int8_blocks(codes, np.ones(8, np.float32), None)
    x = np.full((3, k), 1000.0, np.float32)
    x[1] = -1000.0  # clamps to code 0
    got = _run(core, _layer_file(tmp_path / "l.onnx", packed, [3, k], act_scale=1.0, act_zero_point=0),
               x, isa, monkeypatch)
    expected = sparse_linear(x, packed, 1.0, 0)
    assert expected[0, 0] == 255 * -128 * k
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [40, 515], ids=["shared-panels", "panel-per-task"])
def test_non_finite_activations_quantize_to_the_ends_of_the_range(core, tmp_path, monkeypatch, isa,
                                                                   n) -> None:
    """NaN and -inf become code 0 and +inf code 255, as the scalar kernel's clamps give them."""
    rng = np.random.default_rng(n)
    codes = _block_codes(rng, 32, 48, 0.5)
    packed = pack_int8_blocks(codes, np.full(32, 0.01, np.float32), None)
    x = rng.standard_normal((n, 48)).astype(np.float32)
    x.flat[::7] = np.resize(np.array([np.nan, np.inf, -np.inf], np.float32), x.flat[::7].shape)
    got = _run(core, _layer_file(tmp_path / "l.onnx", packed, [n, 48], act_scale=0.04, act_zero_point=120),
               x, isa, monkeypatch)
    ends = np.nan_to_num(x, nan=-1e30, posinf=1e30, neginf=-1e30)
    np.testing.assert_allclose(got, sparse_linear(ends, packed, 0.04, 120), atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_a_strided_input_is_read_by_its_rows(core, tmp_path, monkeypatch, isa) -> None:
    """x as a 3-d tensor (batch, tokens, features) and as a sliced, non-contiguous numpy view."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((24, 40)).astype(np.float32) * (rng.random((24, 40)) > 0.7)
    packed = pack_f32_csr(weight, None)
    x = rng.standard_normal((2, 9, 80)).astype(np.float32)[:, :, ::2]
    assert not x.flags.c_contiguous
    got = _run(core, _layer_file(tmp_path / "l.onnx", packed, [2, 9, 40]), x, isa, monkeypatch)
    assert got.shape == (2, 9, 24)
    np.testing.assert_allclose(got, sparse_linear(x, packed), atol=1e-5, rtol=0)


# (rows of x, in, hidden, out features, sparsity, fc2 output scale or 0): ViT-like, hidden channels not a
# multiple of 4, N = 1, panels of uneven width, a dense and an all-zero fc1, fc2 with a quantized output
MLP_SHAPES = [(197, 64, 256, 64, 0.9, 0.0), (5, 10, 7, 6, 0.5, 0.01), (1, 13, 17, 3, 0.0, 0.0),
              (300, 64, 130, 50, 0.7, 0.02), (40, 32, 64, 8, 1.0, 0.0), (129, 40, 96, 33, 0.8, 0.05)]


def _mlp_file(path, rng, shape) -> tuple[str, dict, object, np.ndarray, object]:
    n, k, hidden, m, sparsity, out_scale = shape
    fc1 = pack_int8_blocks(_block_codes(rng, hidden, k, sparsity),
                           rng.random(hidden).astype(np.float32) * 1e-3)
    fc2 = pack_int8_blocks(_block_codes(rng, m, hidden, sparsity), rng.random(m).astype(np.float32) * 1e-3,
                           rng.standard_normal(m).astype(np.float32))
    table = rng.integers(0, 256, (hidden, 256)).astype(np.uint8)
    attributes = dict(act_scale=0.05, act_zero_point=117, fc1_out_scale=0.03, fc1_out_zero_point=100,
                      hidden_zero_point=20, out_scale=out_scale, out_zero_point=128 if out_scale else 0)
    node, inits = make_mlp_node("mlp", "x", "y", fc1, table, fc2, attributes)
    save_layer_model([node], inits, [n, k], m, path)
    return str(path), attributes, fc1, table, fc2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=[f"n{s[0]}-k{s[1]}-h{s[2]}-s{s[4]}" for s in MLP_SHAPES])
def test_int8_mlp_kernel_matches_numpy(core, tmp_path, monkeypatch, isa, shape) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[2])
    path, attributes, fc1, table, fc2 = _mlp_file(tmp_path / "mlp.onnx", rng, shape)
    x = (rng.standard_normal((shape[0], shape[1])) * 3).astype(np.float32)
    got = _run(core, path, x, isa, monkeypatch)
    np.testing.assert_allclose(got, sparse_mlp(x, fc1, table, fc2, **attributes), atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=[f"n{s[0]}-k{s[1]}-h{s[2]}-s{s[4]}" for s in MLP_SHAPES])
def test_int8_mlp_kernel_adds_its_addend(core, tmp_path, monkeypatch, isa, shape) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[2] + 1)
    path, attributes, fc1, table, fc2 = _mlp_file(tmp_path / "mlp.onnx", rng, shape)
    x = (rng.standard_normal((shape[0], shape[1])) * 3).astype(np.float32)
    addend = (rng.standard_normal((shape[0], shape[3])) * 10).astype(np.float32)
    got = _run(core, _with_addend(path, [shape[0], shape[3]]), x, isa, monkeypatch, r=addend)
    expected = sparse_mlp(x, fc1, table, fc2, **attributes) + addend
    np.testing.assert_allclose(got, expected, atol=INT8_ATOL, rtol=0)


# (rows of x, in features, out features, sparsity): one panel and several, N = 1 and K not a multiple of
# 4 or 16, a panel per task (y's rows 2 KiB apart), fewer output channels than a block, wide rows
NORM_SHAPES = [(197, 64, 48, 0.9), (1, 13, 17, 0.0), (300, 37, 33, 0.75), (600, 24, 512, 0.8),
               (129, 130, 16, 0.6)]


def _with_norm(path: str, k: int, rng) -> tuple[np.ndarray, np.ndarray, float]:
    """The one-node file at `path` with its node reading x through a LayerNorm (gamma and beta appended
    to its inputs, norm_epsilon set); returns (gamma, beta, epsilon)."""
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(np.float32)
    beta = (0.5 * rng.standard_normal(k)).astype(np.float32)
    norm = (gamma, beta, 1e-6)
    model = onnx.load(path)
    node = model.graph.node[0]
    for name, value in (("gamma", gamma), ("beta", beta)):
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        node.input.append(name)
    node.attribute.append(onnx.helper.make_attribute("norm_epsilon", norm[2]))
    onnx.save(model, path)
    return norm


def _rows_off_ties(x: np.ndarray, norm: tuple, act_scale: float) -> np.ndarray:
    """The rows of x whose normalized values all stay 1e-4 of a quantization step away from a rounding tie:
    there every path gives the reference's codes (elsewhere a sum in another order may round one code
    the other way)."""
    steps = layer_norm(x, *norm) / np.float32(act_scale)
    off = ~np.any(np.abs(steps - np.floor(steps) - 0.5) < 1e-4, axis=-1)
    assert off.mean() > 0.9
    return off


def _rows_with_offsets(rng, shape: tuple[int, int]) -> np.ndarray:
    """x whose rows each have their own offset and spread, as a residual stream's do."""
    spread, offset = 1 + 3 * rng.random((shape[0], 1)), 10 * rng.standard_normal((shape[0], 1))
    return (rng.standard_normal(shape) * spread + offset).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("read_bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=[f"n{s[0]}-k{s[1]}-m{s[2]}-s{s[3]}" for s in NORM_SHAPES])
def test_int8_kernel_normalizes_x(core, tmp_path, monkeypatch, isa, read_bf16, shape) -> None:
    """With norm_epsilon a node reads x through a LayerNorm (each row's mean and variance, then gamma and
    beta per channel) before quantizing it, on every path, from f32 or bf16 x; onnx's reference
    evaluator computes the same."""
    n, k, m, sparsity = shape
    rng = np.random.default_rng(n * 1000 + k + 5)
    packed = pack_int8_blocks(_block_codes(rng, m, k, sparsity), rng.random(m).astype(np.float32) * 0.01,
                              rng.standard_normal(m).astype(np.float32))
    x = _rows_with_offsets(rng, (n, k))
    path = _layer_file(tmp_path / "l.onnx", packed, [n, k], act_scale=0.04, act_zero_point=120)
    norm = _with_norm(path, k, rng)
    if read_bf16:
        got, ran_in = _run_bf16(core, path, x, isa, monkeypatch)
        assert ran_in == {"bf16"}
        x = _bf16(x)
    else:
        got = _run(core, path, x, isa, monkeypatch)
    expected, rows = sparse_linear(x, packed, 0.04, 120, norm=norm), _rows_off_ties(x, norm, 0.04)
    if read_bf16:
        _assert_bf16_close(got[rows], expected[rows])
        return
    np.testing.assert_allclose(got[rows], expected[rows], atol=INT8_ATOL, rtol=0)
    from onnx.reference import ReferenceEvaluator

    (reference,) = ReferenceEvaluator(path, new_ops=[SparseLinear]).run(None, {"x": x})
    np.testing.assert_allclose(reference[rows], expected[rows], atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", MLP_SHAPES[:4], ids=[f"n{s[0]}-k{s[1]}-h{s[2]}-s{s[4]}"
                                                       for s in MLP_SHAPES[:4]])
def test_int8_mlp_kernel_normalizes_x(core, tmp_path, monkeypatch, isa, shape) -> None:
    """The MLP node reads x through its LayerNorm as fc1's input, on every path (the fused kernel and the
    composed one)."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[2] + 5)
    path, attributes, fc1, table, fc2 = _mlp_file(tmp_path / "mlp.onnx", rng, shape)
    norm = _with_norm(path, shape[1], rng)
    x = _rows_with_offsets(rng, (shape[0], shape[1]))
    got = _run(core, path, x, isa, monkeypatch)
    rows = _rows_off_ties(x, norm, attributes["act_scale"])
    expected = sparse_mlp(x, fc1, table, fc2, **attributes, norm=norm)
    np.testing.assert_allclose(got[rows], expected[rows], atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize(("case", "message"), [
    ("f32 weight", "only an int8_1x4 node normalizes"), ("negative epsilon", "must be positive"),
    ("gamma too short", "one value per input channel"), ("no gamma and beta", "takes its LayerNorm's"),
    ("mlp without gamma and beta", "takes its LayerNorm's"),
])
def test_a_node_with_a_malformed_layer_norm_is_refused(tmp_path, case, message) -> None:
    rng = np.random.default_rng(5)
    path = str(tmp_path / "l.onnx")
    if case.startswith("mlp"):
        _mlp_file(path, rng, MLP_SHAPES[1])
    else:
        weight = _small_weight(rng, 8, case == "f32 weight")
        _layer_file(path, weight, [2, 16], act_scale=0.1, act_zero_point=0)
    _with_norm(path, 10 if case.startswith("mlp") else 16, rng)
    model = onnx.load(path)
    node = model.graph.node[0]
    if case == "negative epsilon":
        next(a for a in node.attribute if a.name == "norm_epsilon").f = -1e-6
    elif case == "gamma too short":
        gamma = next(i for i in model.graph.initializer if i.name == "gamma")
        gamma.CopyFrom(onnx.numpy_helper.from_array(np.ones(15, np.float32), "gamma"))
    elif "without gamma and beta" in case or case == "no gamma and beta":
        del node.input[-2:]
    onnx.save(model, path)
    _assert_refused(path, message)


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16, to nearest even, as floats (no NaN here)."""
    bits = np.asarray(values, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def _run_bf16(core, path: str, x: np.ndarray, isa: str, monkeypatch, **inputs: np.ndarray):
    """The one-node file with its INT8 node reading x (and its addend) and writing y as bf16
    (bf16_kernel_io), under the f32 hint, so that the Converts around it do convert: its output, and the
    precision OpenVINO ran the node in."""
    monkeypatch.setenv(ENV_ISA, isa)
    network = core.read_model(path)
    assert bf16_kernel_io(network) == 1
    compiled = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                   "INFERENCE_NUM_THREADS": 2})
    ran_in = {_rt(op, "runtimePrecision") for op in _kernel_ops(compiled)}
    return compiled({"x": x, **inputs})[0], ran_in


def _rt(op, key: str) -> str:
    """A runtime-model node's execution info: layerType, runtimePrecision and the like."""
    return op.get_rt_info()[key].astype(str)


def _kernel_ops(compiled) -> list:
    """The nodes of a compiled model OpenVINO runs through their own `evaluate`: vitsparse's."""
    ops = compiled.get_runtime_model().get_ordered_ops()
    return [op for op in ops if _rt(op, "layerType") == "Reference"]


def _assert_bf16_close(got: np.ndarray, exact: np.ndarray) -> None:
    """got is exact rounded to bfloat16: every element a bfloat16 value, within one bfloat16 step of the
    rounded float result (the float sums may differ in their last bits, and a rounding step with them)."""
    np.testing.assert_array_equal(got, _bf16(got))
    np.testing.assert_allclose(got, _bf16(exact), rtol=2.0 ** -7, atol=INT8_ATOL)


# (rows of x, in features, out features, sparsity, with an addend): a panel per task and shared panels,
# N = 1 and K not a multiple of 4, fewer output channels than a block, y's rows half a line of bfloat16
BF16_SHAPES = [(197, 64, 48, 0.9, True), (1, 13, 17, 0.0, False), (300, 37, 33, 0.75, True),
               (16, 16, 1, 0.3, True), (600, 24, 512, 0.8, False), (129, 130, 16, 0.6, True)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=["n{}-k{}-m{}-s{}-r{}".format(*s) for s in BF16_SHAPES])
def test_int8_kernel_reads_and_writes_bf16(core, tmp_path, monkeypatch, isa, shape) -> None:
    """Given bf16 x (and addend), an INT8 node computes as for their float values and writes y rounded
    to bfloat16 once, on every path."""
    n, k, m, sparsity, with_addend = shape
    rng = np.random.default_rng(n * 1000 + k + 2)
    codes = _block_codes(rng, m, k, sparsity)
    scale, bias = rng.random(m).astype(np.float32) * 0.01, rng.standard_normal(m).astype(np.float32)
    packed = pack_int8_blocks(codes, scale, bias)
    x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    path = _layer_file(tmp_path / "l.onnx", packed, [n, k], act_scale=0.04, act_zero_point=120)
    exact = sparse_linear(_bf16(x), packed, 0.04, 120)
    inputs = {}
    if with_addend:
        inputs["r"] = (rng.standard_normal((n, m)) * 10).astype(np.float32)
        path = _with_addend(path, [n, m])
        exact = exact + _bf16(inputs["r"])
    got, ran_in = _run_bf16(core, path, x, isa, monkeypatch, **inputs)
    assert ran_in == {"bf16"}
    _assert_bf16_close(got, exact)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", HEADS_SHAPES[:3] + HEADS_SHAPES[-1:],
                         ids=["b{}-t{}-k{}-h{}x{}".format(*s) for s in HEADS_SHAPES[:3] + HEADS_SHAPES[-1:]])
def test_int8_kernel_split_into_heads_writes_bf16(core, tmp_path, monkeypatch, isa, shape) -> None:
    """q, kᵀ and v head by head in bfloat16, kᵀ's rows rounded as they are copied, on every path."""
    batch, tokens, k, heads, head_dim = shape
    m = 3 * heads * head_dim
    rng = np.random.default_rng(tokens * 100 + k + 2)
    packed = pack_int8_blocks(_block_codes(rng, m, k, 0.7), rng.random(m).astype(np.float32) * 0.01,
                              rng.standard_normal(m).astype(np.float32))
    x = (rng.standard_normal((batch, tokens, k)) * 3).astype(np.float32)
    got, ran_in = _run_bf16(core, _heads_file(tmp_path / "l.onnx", packed, [batch, tokens, k], heads), x, isa,
                            monkeypatch)
    assert ran_in == {"bf16"}
    _assert_bf16_close(got, split_heads(sparse_linear(_bf16(x), packed, 0.04, 120), heads))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", MLP_SHAPES[:4], ids=[f"n{s[0]}-k{s[1]}-h{s[2]}-s{s[4]}"
                                                       for s in MLP_SHAPES[:4]])
def test_int8_mlp_kernel_reads_and_writes_bf16(core, tmp_path, monkeypatch, isa, shape) -> None:
    """The MLP node with bf16 x, addend and y: fused on AVX-512 VBMI, composed through float hidden
    values on the other paths."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[2] + 2)
    path, attributes, fc1, table, fc2 = _mlp_file(tmp_path / "mlp.onnx", rng, shape)
    x = (rng.standard_normal((shape[0], shape[1])) * 3).astype(np.float32)
    addend = (rng.standard_normal((shape[0], shape[3])) * 10).astype(np.float32)
    got, ran_in = _run_bf16(core, _with_addend(path, [shape[0], shape[3]]), x, isa, monkeypatch, r=addend)
    assert ran_in == {"bf16"}
    _assert_bf16_close(got, sparse_mlp(_bf16(x), fc1, table, fc2, **attributes) + _bf16(addend))


def test_bf16_io_is_refused_where_a_node_cannot_take_it(core, tmp_path) -> None:
    """An addend of another type than x, and bf16 x for the float formats, fail with clear errors;
    bf16_kernel_io leaves the float formats alone."""
    import openvino.opset13 as opset

    rng = np.random.default_rng(0)
    packed = pack_int8_blocks(_block_codes(rng, 4, 16, 0.5), np.ones(4, np.float32))
    path = _layer_file(tmp_path / "l.onnx", packed, [2, 16], act_scale=0.1, act_zero_point=0)
    path = _with_addend(path, [2, 4])
    network = core.read_model(path)
    node = next(op for op in network.get_ordered_ops() if op.get_type_name() == "SparseLinear")
    node.input(0).replace_source_output(opset.convert(node.input_value(0), "bf16").output(0))
    with pytest.raises(RuntimeError, match="the addend must be bf16 as x is, got f32"):
        node.validate_and_infer_types()
    path = _layer_file(tmp_path / "f.onnx", pack_f32_csr(np.eye(4, dtype=np.float32)), [2, 4])
    network = core.read_model(path)
    assert bf16_kernel_io(network) == 0
    node = next(op for op in network.get_ordered_ops() if op.get_type_name() == "SparseLinear")
    node.input(0).replace_source_output(opset.convert(node.input_value(0), "bf16").output(0))
    with pytest.raises(RuntimeError, match="x must be f32, got bf16"):
        node.validate_and_infer_types()


def test_an_addend_of_another_shape_is_refused_with_a_clear_error(tmp_path) -> None:
    rng = np.random.default_rng(0)
    path, *_ = _mlp_file(tmp_path / "mlp.onnx", rng, (2, 16, 8, 4, 0.5, 0.0))
    with pytest.raises(EngineLoadError, match="addend's shape"):
        create_engine("openvino-sparse", _with_addend(path, [2, 5]), batch_size=2)
    packed = pack_f32_csr(np.eye(4, dtype=np.float32))
    with pytest.raises(EngineLoadError, match="takes 5 inputs, got 6"):  # only INT8 nodes take one
        path = _layer_file(tmp_path / "f.onnx", packed, [2, 4])
        create_engine("openvino-sparse", _with_addend(path, [2, 4]), batch_size=2)


def test_an_int8_mlp_becomes_one_node_that_computes_what_the_layers_did(core, tmp_path, monkeypatch) -> None:
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(3)
    original = qdq_mlp_model(_block_codes(rng, 36, 24, 0.8), _block_codes(rng, 16, 36, 0.8), 5)
    fused = onnx.ModelProto()
    fused.CopyFrom(original)
    assert to_sparse_kernels(fused, min_sparsity=0.5) == 2
    assert [node.op_type for node in fused.graph.node] == ["SparseMLP", "Add", "Identity"]  # fc2's bias
    path = tmp_path / "fused.onnx"
    onnx.save(fused, str(path))
    x = (rng.standard_normal((5, 24)) * 2).astype(np.float32)
    expected = ReferenceEvaluator(original).run(None, {"x": x})[0]
    reference = ReferenceEvaluator(fused, new_ops=[SparseLinear, SparseMLP]).run(None, {"x": x})[0]
    # ONNX's QuantizeLinear divides by the scale, the kernels multiply by its inverse: a rare near-tie
    # may land one code step away in fc1's or fc2's output (steps of 0.05)
    assert np.abs(reference - expected).max() < 0.5 and np.mean(reference == expected) > 0.9
    got = _run(core, str(path), x, "avx512", monkeypatch)
    np.testing.assert_allclose(got, reference, atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize("shape", ["same", "broadcast"])
def test_a_residual_add_after_a_kernel_node_becomes_its_addend(core, tmp_path, monkeypatch, shape) -> None:
    """MLP → its bias → + r: r becomes the node's addend (the bias going into the node) when it has the
    output's shape; a broadcast r stays an Add."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(4)
    original = qdq_mlp_model(_block_codes(rng, 36, 24, 0.8), _block_codes(rng, 16, 36, 0.8), 5)
    identity = next(node for node in original.graph.node if node.op_type == "Identity")
    original.graph.node.remove(identity)
    original.graph.node.append(onnx.helper.make_node("Add", [identity.input[0], "r"], ["y"]))
    r_shape = [5, 16] if shape == "same" else [1, 16]
    original.graph.input.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, r_shape))
    fused = onnx.ModelProto()
    fused.CopyFrom(original)
    assert to_sparse_kernels(fused, min_sparsity=0.5) == 2
    types = [node.op_type for node in fused.graph.node]
    assert types == (["SparseMLP"] if shape == "same" else ["SparseMLP", "Add", "Add"])
    assert (fused.graph.node[0].input[-1] == "r") == (shape == "same")
    path = tmp_path / "fused.onnx"
    onnx.save(fused, str(path))
    x = (rng.standard_normal((5, 24)) * 2).astype(np.float32)
    r = (rng.standard_normal(r_shape) * 5).astype(np.float32)
    expected = ReferenceEvaluator(original).run(None, {"x": x, "r": r})[0]
    reference = ReferenceEvaluator(fused, new_ops=[SparseLinear, SparseMLP]).run(None, {"x": x, "r": r})[0]
    assert np.abs(reference - expected).max() < 0.5 and np.mean(np.abs(reference - expected) < 1e-5) > 0.9
    got = _run(core, str(path), x, "avx512", monkeypatch, r=r)
    np.testing.assert_allclose(got, reference, atol=INT8_ATOL, rtol=0)


def test_a_quantizer_after_the_bias_keeps_the_residual_add_out_of_the_node(tmp_path) -> None:
    """MatMul → + bias → Q → DQ → + r: the kernels would quantize before the bias, so nothing is folded."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(5)
    codes = _block_codes(rng, 16, 24, 0.8)
    scale, bias = rng.random(16).astype(np.float32) * 0.01, rng.standard_normal(16).astype(np.float32)
    dense_int8_model(codes, scale, bias, 3, tmp_path / "layer.onnx")
    original = onnx.load(str(tmp_path / "layer.onnx"))
    # opset 19: the newest onnx's reference evaluator has no DequantizeLinear before it
    next(entry for entry in original.opset_import if entry.domain == "").version = 19
    graph = original.graph
    graph.node[-1].output[0] = "biased"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.float32(0.05), "os"),
                              onnx.numpy_helper.from_array(np.uint8(128), "oz")])
    graph.node.extend([onnx.helper.make_node("QuantizeLinear", ["biased", "os", "oz"], ["oq"]),
                       onnx.helper.make_node("DequantizeLinear", ["oq", "os", "oz"], ["odq"]),
                       onnx.helper.make_node("Add", ["odq", "r"], ["y"])])
    graph.input.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [3, 16]))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    assert to_sparse_kernels(rewritten, min_sparsity=0.5) == 1
    types = [node.op_type for node in rewritten.graph.node]
    assert types == ["SparseLinear", "QuantizeLinear", "DequantizeLinear", "Add"]
    x, r = rng.standard_normal((3, 24)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    expected = ReferenceEvaluator(original).run(None, {"x": x, "r": r})[0]
    got = ReferenceEvaluator(rewritten, new_ops=[SparseLinear, SparseMLP]).run(None, {"x": x, "r": r})[0]
    assert np.abs(got - expected).max() <= 0.05 + 1e-6 and np.mean(np.abs(got - expected) < 1e-5) > 0.9


def test_a_malformed_mlp_node_is_refused_with_a_clear_error(tmp_path) -> None:
    rng = np.random.default_rng(0)
    path, *_ = _mlp_file(tmp_path / "mlp.onnx", rng, (2, 16, 8, 4, 0.5, 0.0))
    model = onnx.load(path)
    table = next(init for init in model.graph.initializer if init.name == "mlp.table")
    table.CopyFrom(onnx.numpy_helper.from_array(np.zeros((7, 256), np.uint8), "mlp.table"))
    onnx.save(model, path)
    _assert_refused(path, "256 per hidden channel")


def test_packing_round_trips() -> None:
    rng = np.random.default_rng(0)
    codes = _block_codes(rng, 9, 14, 0.6)
    np.testing.assert_array_equal(unpack(pack_int8_blocks(codes, np.ones(9, np.float32))), codes)
    weight = rng.standard_normal((9, 14)).astype(np.float32) * (rng.random((9, 14)) > 0.5)
    np.testing.assert_array_equal(unpack(pack_f32_csr(weight)), weight)
    rounded = unpack(pack_bf16_pairs(weight))
    np.testing.assert_array_equal(rounded == 0, weight == 0)
    np.testing.assert_allclose(rounded, weight, rtol=2.0 ** -8)


def _malformed(packed, part: int, value) -> object:
    arrays = list(packed.arrays)
    arrays[part] = np.asarray(value, dtype=arrays[part].dtype)
    return type(packed)(packed.format, packed.rows, packed.cols, tuple(arrays))


@pytest.mark.parametrize(("case", "message"), [
    ("block past the end", "outside"), ("offsets decrease", "decrease"), ("too few codes", "codes"),
    ("bad format", "format must be"), ("no in_features", "in_features"), ("no weights", "takes 7 inputs"),
])
def test_a_malformed_node_is_refused_with_a_clear_error(core, tmp_path, case, message) -> None:
    packed = pack_int8_blocks(_block_codes(np.random.default_rng(0), 4, 16, 0.5), np.ones(4, np.float32))
    attributes = {"act_scale": 0.1, "act_zero_point": 0}
    if case == "block past the end":
        packed = _malformed(packed, 1, np.full_like(packed.arrays[1], 4))  # 16 channels: blocks 0..3
    elif case == "offsets decrease":
        offsets = packed.arrays[0].copy()
        offsets[2] = offsets[3] + 1
        packed = _malformed(packed, 0, offsets)
    elif case == "too few codes":
        packed = _malformed(packed, 2, packed.arrays[2][:-1])
    path = _layer_file(tmp_path / "l.onnx", packed, [2, 16], **attributes)
    model = onnx.load(path)
    node = model.graph.node[0]
    if case == "bad format":
        next(a for a in node.attribute if a.name == "format").s = b"int4_2x2"
    elif case == "no in_features":
        kept = [a for a in node.attribute if a.name != "in_features"]
        del node.attribute[:]
        node.attribute.extend(kept)
    elif case == "no weights":
        del node.input[1:]
    onnx.save(model, path)
    _assert_refused(path, message)
    assert inspect_onnx(path).path == str(path)  # the inspector reads what the engine refuses


def _masked_vit(quantize: bool):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    manager = PassManager(trace(small_vit(depth=2)), recipe=Recipe(base={"model": "test"}))
    manager.run(MagnitudePass(SparsityConfig(sparsity=0.9, pattern="1x4" if quantize else "unstructured")))
    if quantize:
        manager.run(QuantizePass(QuantConfig(), calibration=images))
    with torch.no_grad():
        expected = manager.graph_module(images).numpy()
    return manager, images, expected


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "int8"])
def test_a_masked_vit_exported_with_sparse_kernels_matches_torch(tmp_path, quantize) -> None:
    manager, images, expected = _masked_vit(quantize)
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "artifact",
                             ExportConfig(batch_size=2, sparse_kernels=True))
    model = onnx.load(str(result.directory / "model.onnx"))
    counts = [sum(node.op_type == op for node in model.graph.node) for op in ("SparseLinear", "SparseMLP")]
    # qkv, proj, fc1, fc2 of 2 blocks; INT8 fuses each block's fc1 and fc2 into one SparseMLP node
    assert counts == ([4, 2] if quantize else [8, 0])
    # INT8: proj and the MLP take in the residual Add after them (with proj's output Q → DQ and both
    # biases); qkv and the MLP compute the LayerNorm before them (its gamma and beta after the weight),
    # which leaves only the final norm's ReduceMeans
    constants = {init.name for init in model.graph.initializer}
    kernel_nodes = [node for node in model.graph.node if node.op_type in ("SparseLinear", "SparseMLP")]
    with_addend = sorted(node.name.split("_")[0] for node in kernel_nodes if node.input[-1] not in constants)
    assert with_addend == (["fc1", "fc1", "proj", "proj"] if quantize else [])
    normalizing = sorted(node.name.split("_")[0] for node in kernel_nodes
                         if any(a.name == "norm_epsilon" for a in node.attribute))
    assert normalizing == (["fc1", "fc1", "qkv", "qkv"] if quantize else [])
    assert sum(node.op_type == "ReduceMean" for node in model.graph.node) == (2 if quantize else 10)
    # INT8: qkv writes q, kᵀ and v for its 3 heads, and the transposes between it and attention are gone;
    # the second also quantizes its output, the first keeps the model's last QuantizeLinear, which
    # OpenVINO needs to run attention in INT8 at all
    heads = [a.i for node in model.graph.node for a in node.attribute if a.name == "heads"]
    assert heads == ([3, 3] if quantize else [])
    int8_output = [node.name for node in model.graph.node for a in node.attribute if a.name == "int8_output"]
    quantizers = [node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"]
    assert (int8_output, quantizers) == ((["qkv_1_MatMul_sparse"], ["/qkv/MatMul_output_0"]) if quantize
                                         else ([], []))
    perms = [list(a.ints) for node in model.graph.node if node.op_type == "Transpose" for a in node.attribute]
    assert ([2, 0, 3, 1, 4] in perms, [0, 1, 3, 2] in perms) == ((False, False) if quantize else (True, True))
    # INT8: proj reads attention's output head by head, so the transpose before it goes too
    x_heads = [(node.name.split("_")[0], a.i) for node in model.graph.node for a in node.attribute
               if a.name == "x_heads"]
    assert (x_heads, [0, 2, 1, 3] in perms) == (([("proj", 3)] * 2, False) if quantize else ([], True))
    assert result.meta["sparse_kernels"]["layers"] == 8
    # the unmasked layers (patch embedding, head) stay OpenVINO's own
    assert any(node.op_type in ("MatMul", "Gemm") for node in model.graph.node)
    engine = create_engine("openvino-sparse", result.directory / "model.onnx", batch_size=2, precision="f32")
    (logits,) = engine.run([images.numpy()])
    limit = 0.2 if quantize else 1e-4  # INT8: the export's own tolerance against fake-quantized torch
    assert np.abs(logits - expected).max() < limit


def test_an_int8_export_on_bf16_keeps_its_kernel_nodes_in_bf16(tmp_path) -> None:
    """With the bf16 hint the INT8 kernel nodes read and write bfloat16 as the nodes around them do:
    OpenVINO runs them in bf16 with no Reorder on either side, and the logits are those of the f32 hint
    within bfloat16's error."""
    from vitsparse.runtime import openvino_engine

    if "BF16" not in openvino_engine.cpu_capabilities():
        with pytest.raises(UnsupportedPrecisionError, match="it has no BF16"):
            check_engine_spec("openvino-sparse:bf16")
        pytest.skip("this CPU has no bf16 instructions (refused with a clear error, checked above)")
    manager, images, _ = _masked_vit(True)
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "artifact",
                             ExportConfig(batch_size=2, sparse_kernels=True))
    path = result.directory / "model.onnx"
    (f32,) = create_engine("openvino-sparse", path, batch_size=2, precision="f32").run([images.numpy()])
    engine = create_engine("openvino-sparse", path, batch_size=2, precision="bf16")
    (logits,) = engine.run([images.numpy()])
    kernels = _kernel_ops(engine._compiled)
    assert len(kernels) == 6  # qkv, proj and the MLP of 2 blocks
    assert {_rt(op, "runtimePrecision") for op in kernels} == {"bf16"}
    neighbours = [port.get_source_output().get_node() for op in kernels for port in op.inputs()]
    neighbours += [port.get_node() for op in kernels for port in op.output(0).get_target_inputs()]
    assert "Reorder" not in {_rt(node, "layerType") for node in neighbours}
    assert np.abs(logits - f32).max() <= 0.05 * (np.abs(f32).max() + 1)


def _qdq_vit_file(tmp_path) -> tuple[onnx.ModelProto, np.ndarray]:
    """The masked INT8 ViT's plain QDQ export, and its images."""
    manager, images, _ = _masked_vit(quantize=True)
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "plain",
                             ExportConfig(batch_size=2))
    return onnx.load(str(result.directory / "model.onnx")), images.numpy()


@pytest.mark.parametrize("zero_point", [128, 120], ids=["symmetric", "asymmetric"])
def test_qkv_writing_the_heads_changes_no_result(tmp_path, monkeypatch, zero_point) -> None:
    """The same INT8 ViT with and without qkv writing q, kᵀ and v (and without k's bias, which the
    softmax cancels) and its output codes: the same logits on openvino-sparse, to float rounding; also
    with qkv's output quantizer moved off the symmetric zero point (the node's int8 codes then have
    zero point −8)."""
    import vitsparse.compiler.sparse_heads as sparse_heads

    model, images = _qdq_vit_file(tmp_path)
    qkv_zero_points = {node.input[2] for node in model.graph.node  # the quantizers of qkv's MatMul outputs
                       if node.op_type == "QuantizeLinear" and node.input[0].startswith("/qkv")
                       and node.input[0].endswith("MatMul_output_0")}
    assert len(qkv_zero_points) == 2
    for init in model.graph.initializer:
        if init.name in qkv_zero_points:
            assert int(onnx.numpy_helper.to_array(init)) == 128
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(zero_point, np.uint8), init.name))
    logits = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(sparse_heads, "fuse_attention_heads", lambda model, shapes: 0)
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        to_sparse_kernels(rewritten, 0.5, "f32", 0.5)
        assert any(a.name == "heads" for node in rewritten.graph.node for a in node.attribute) == fused
        codes_zero_points = [int(onnx.numpy_helper.to_array(init)) for init in rewritten.graph.initializer
                             if init.name.endswith(".codes_zero_point")]
        assert codes_zero_points == ([] if zero_point == 128 or not fused else [zero_point - 128])
        onnx.save(rewritten, str(tmp_path / f"{fused}.onnx"))
        engine = create_engine("openvino-sparse", tmp_path / f"{fused}.onnx", batch_size=2, precision="f32")
        (logits[fused],) = engine.run([images])
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-4 * np.abs(logits[False]).max(), rtol=0)


def _layer_normalization_model(read_elsewhere: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """x → LayerNormalization (opset 17) → an INT8 SparseLinear → y, the normalized x also a graph
    output where `read_elsewhere`; and an x for it."""
    rng = np.random.default_rng(6)
    packed = pack_int8_blocks(_block_codes(rng, 8, 16, 0.5), rng.random(8).astype(np.float32) * 0.01,
                              rng.standard_normal(8).astype(np.float32))
    node, inits = make_node("layer", "normalized", "y", packed, act_scale=0.04, act_zero_point=120)
    inits += [onnx.numpy_helper.from_array((1 + 0.3 * rng.standard_normal(16)).astype(np.float32), "gamma"),
              onnx.numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "beta")]
    norm = onnx.helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normalized"], "norm",
                                 axis=-1, epsilon=1e-5)
    outputs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 8])]
    if read_elsewhere:
        outputs.append(onnx.helper.make_tensor_value_info("normalized", onnx.TensorProto.FLOAT, [2, 5, 16]))
    graph = onnx.helper.make_graph([norm, node], "g", [onnx.helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [2, 5, 16])], outputs, inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                          onnx.helper.make_opsetid("com.vitsparse", 1)])
    return model, _rows_with_offsets(rng, (10, 16)).reshape(2, 5, 16)


@pytest.mark.parametrize("read_elsewhere", [False, True], ids=["only-reader", "read-elsewhere"])
def test_a_layer_norm_before_an_int8_node_moves_into_it(read_elsewhere) -> None:
    """ONNX's LayerNormalization in front of an INT8 node becomes the node's own (torch's decomposed
    form: the masked-ViT export test), with the same results; not where its output is read elsewhere."""
    from onnx.reference import ReferenceEvaluator

    from vitsparse.compiler.quantized_onnx import _Graph
    from vitsparse.compiler.sparse_norms import fuse_layer_norms

    model, x = _layer_normalization_model(read_elsewhere)
    (before,) = ReferenceEvaluator(model, new_ops=[SparseLinear]).run(["y"], {"x": x})
    assert fuse_layer_norms(model, {"x": (2, 5, 16)}) == (0 if read_elsewhere else 1)
    _Graph(model).prune()
    ops = [node.op_type for node in model.graph.node]
    assert ops == (["LayerNormalization", "SparseLinear"] if read_elsewhere else ["SparseLinear"])
    (after,) = ReferenceEvaluator(model, new_ops=[SparseLinear]).run(["y"], {"x": x})
    np.testing.assert_allclose(after, before, atol=INT8_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["only reader", "read elsewhere", "other perm"])
def test_proj_reads_attention_heads_where_only_it_reads_them(case) -> None:
    """x [batch, heads, tokens, head dim] → Transpose(0, 2, 1, 3) → Reshape → an INT8 SparseLinear: the
    node reads x head by head instead, with the same results; not where the reshaped x is read elsewhere
    or the Transpose moves other axes."""
    from onnx.reference import ReferenceEvaluator

    from vitsparse.compiler.quantized_onnx import _Graph
    from vitsparse.compiler.sparse_heads_input import read_heads_input

    rng = np.random.default_rng(8)
    packed = pack_int8_blocks(_block_codes(rng, 8, 24, 0.5), rng.random(8).astype(np.float32) * 0.01,
                              rng.standard_normal(8).astype(np.float32))
    node, inits = make_node("proj", "tokens", "y", packed, act_scale=0.04, act_zero_point=120)
    inits.append(onnx.numpy_helper.from_array(np.array([2, 5, 24], np.int64), "shape"))
    perm = [0, 2, 3, 1] if case == "other perm" else [0, 2, 1, 3]  # (3 heads of 8 over 5 tokens either way)
    x_shape = [2, 3, 5, 8] if case != "other perm" else [2, 3, 8, 5]
    nodes = [onnx.helper.make_node("Transpose", ["x"], ["moved"], "move", perm=perm),
             onnx.helper.make_node("Reshape", ["moved", "shape"], ["tokens"], "merge"), node]
    outputs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 8])]
    if case == "read elsewhere":
        outputs.append(onnx.helper.make_tensor_value_info("tokens", onnx.TensorProto.FLOAT, [2, 5, 24]))
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, x_shape)], outputs, inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                          onnx.helper.make_opsetid("com.vitsparse", 1)])
    x = (rng.standard_normal(x_shape) * 3).astype(np.float32)
    (before,) = ReferenceEvaluator(model, new_ops=[SparseLinear]).run(["y"], {"x": x})
    moved_shape = tuple(x_shape[i] for i in perm)
    assert read_heads_input(model, {"x": tuple(x_shape), "moved": moved_shape, "tokens": (2, 5, 24)}) \
        == (1 if case == "only reader" else 0)
    _Graph(model).prune()
    ops = [node.op_type for node in model.graph.node]
    assert ops == (["SparseLinear"] if case == "only reader" else ["Transpose", "Reshape", "SparseLinear"])
    (after,) = ReferenceEvaluator(model, new_ops=[SparseLinear]).run(["y"], {"x": x})
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("change", ["no softmax", "a factor per key", "scores as divisor", "k read twice"])
def test_qkv_keeps_its_layout_where_k_bias_may_matter(tmp_path, change) -> None:
    """k's bias is only left out where k reaches a softmax over keys through scalings by one number:
    any other graph keeps the plain qkv node."""
    model, _ = _qdq_vit_file(tmp_path)
    graph = model.graph
    if change == "no softmax":
        for node in graph.node:
            if node.op_type == "Softmax":
                node.op_type = "Sigmoid"
                del node.attribute[:]
    elif change == "a factor per key":  # the scores (5 keys) times a factor per key before the softmax
        softmax = next(node for node in graph.node if node.op_type == "Softmax")
        factors = onnx.numpy_helper.from_array(np.linspace(1, 2, 5, dtype=np.float32), "per_key")
        graph.initializer.append(factors)
        graph.node.append(onnx.helper.make_node("Mul", [softmax.input[0], "per_key"], ["scaled_scores"]))
        softmax.input[0] = "scaled_scores"
    elif change == "scores as divisor":  # one number divided by the scores before the softmax
        softmax = next(node for node in graph.node if node.op_type == "Softmax")
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "numerator"))
        graph.node.append(onnx.helper.make_node("Div", ["numerator", softmax.input[0]], ["divided_scores"]))
        softmax.input[0] = "divided_scores"
    else:  # k also read by another node
        k_transpose = next(node for node in graph.node if node.op_type == "Transpose"
                           and list(node.attribute[0].ints) == [0, 1, 3, 2])
        graph.node.append(onnx.helper.make_node("Identity", [k_transpose.input[0]], ["k_again"]))
        graph.output.append(onnx.helper.make_tensor_value_info("k_again", onnx.TensorProto.FLOAT, None))
    from vitsparse.compiler.quantized_onnx import _topological_sort

    _topological_sort(graph)
    to_sparse_kernels(model, 0.5, "f32", 0.5)
    heads = [a.i for node in graph.node for a in node.attribute if a.name == "heads"]
    # every softmax changed, or only the first block's k
    assert heads == ([] if change == "no softmax" else [3])


def test_sparse_nodes_count_as_the_products_they_replace(tmp_path) -> None:
    """MACs and shapes follow the graph through SparseLinear and SparseMLP, and on openvino-sparse their
    INT8 kernels count as INT8: the same figures as the plain export on openvino."""
    manager, _, _ = _masked_vit(quantize=True)
    reports, shares = {}, {}
    for engine, sparse_kernels in (("openvino", False), ("openvino-sparse", True)):
        result = export_artifact(manager.graph_module, manager.recipe, tmp_path / engine,
                                 ExportConfig(batch_size=2, sparse_kernels=sparse_kernels))
        reports[engine] = inspect_onnx(result.directory / "model.onnx")
        shares[engine] = create_engine(engine, result.directory / "model.onnx", batch_size=2).int8_mac_share
    plain, sparse = reports["openvino"], reports["openvino-sparse"]
    assert sparse.layers_without_macs == 0 and sparse.macs == plain.macs
    assert [layer.macs for layer in sparse.layers] == [layer.macs for layer in plain.layers]
    kinds = [layer.op_type for layer in sparse.layers if layer.int8_kernel]
    assert kinds == ["SparseLinear", "SparseLinear", "SparseMLP", "SparseMLP"] * 2  # qkv, proj, fc1, fc2
    assert 0.5 < shares["openvino"] < 1 and shares["openvino-sparse"] == pytest.approx(shares["openvino"])


@pytest.mark.parametrize("quantize, precision", [(False, "f32"), (False, "bf16"), (True, "f32")],
                         ids=["f32", "bf16", "int8"])
def test_sparse_nodes_count_their_weights_as_the_plain_export_does(tmp_path, quantize, precision) -> None:
    """Each product of a kernel node is one prunable weight of its dense shape with its stored non-zeros,
    and INT8 weights count as parameters: the plain and the sparse-kernel file report the same
    prunable weights as the model's own layers."""
    manager, _, _ = _masked_vit(quantize)
    reports = {}
    for sparse_kernels in (False, True):
        # bf16 counts all-zero pairs, 81 % of an unstructured 90 % mask: below the default with AMX-BF16
        config = ExportConfig(batch_size=2, sparse_kernels=sparse_kernels, sparse_precision=precision,
                              sparse_min_sparsity=0.75)
        result = export_artifact(manager.graph_module, manager.recipe, tmp_path / str(sparse_kernels), config)
        reports[sparse_kernels] = inspect_onnx(result.directory / "model.onnx")
    plain, sparse = reports[False], reports[True]
    folded = fold_for_export(manager.graph_module)
    layers = [m for m in folded.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert plain.prunable_params == sparse.prunable_params == sum(m.weight.numel() for m in layers)
    nonzeros = sum(int(m.weight.count_nonzero()) for m in layers)
    # INT8 rounds some small weights to code 0; float keeps every non-zero (bf16 rounding keeps them too)
    assert (plain.prunable_nonzeros < nonzeros) if quantize else (plain.prunable_nonzeros == nonzeros)
    assert sparse.prunable_nonzeros == plain.prunable_nonzeros and sparse.prunable_sparsity > 0.6
    kernel_weights = [w for w in sparse.weights if w.layer_op in ("SparseLinear", "SparseMLP")]
    assert len(kernel_weights) == 8 and all(w.param for w in kernel_weights)
    stored = "int8" if quantize else {"f32": "float32", "bf16": "bfloat16"}[precision]
    assert {w.dtype for w in kernel_weights} == {stored}
    # the stored index arrays and row sums are not parameters; biases and scales are
    assert abs(sparse.params - plain.params) < 0.01 * plain.params


def test_below_the_minimum_sparsity_a_layer_stays_dense(tmp_path) -> None:
    manager, _, _ = _masked_vit(quantize=False)
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "artifact",
                             ExportConfig(batch_size=2, sparse_kernels=True, sparse_min_sparsity=0.95))
    assert result.meta["sparse_kernels"] == {"layers": 0, "min_sparsity": 0.95, "int8_min_sparsity": 0.95,
                                             "precision": "f32"}


def test_int8_layers_have_a_threshold_of_their_own() -> None:
    rng = np.random.default_rng(4)
    model = qdq_mlp_model(_block_codes(rng, 36, 24, 0.8), _block_codes(rng, 16, 36, 0.8), 5)
    kept = onnx.ModelProto()
    kept.CopyFrom(model)
    assert to_sparse_kernels(kept, min_sparsity=0.5, int8_min_sparsity=0.9) == 0  # 80 % of blocks are zero
    assert to_sparse_kernels(model, min_sparsity=0.9, int8_min_sparsity=0.5) == 2


@pytest.mark.parametrize("amx", [False, True], ids=["vector-cpu", "amx-cpu"])
def test_the_engine_warns_of_kernel_nodes_below_this_cpus_crossover(tmp_path, monkeypatch, amx) -> None:
    """A file exported where 80 % zero blocks pay (no AMX) warns on a CPU where dense INT8 wins there."""
    flags = ("avx2", "avx512f", "avx512_vnni") + (("amx_tile", "amx_int8") if amx else ())
    monkeypatch.setattr(kernel_crossover, "cpu_flags", lambda: flags)
    codes = _block_codes(np.random.default_rng(5), 40, 32, 0.8)
    path = _layer_file(tmp_path / "l.onnx", pack_int8_blocks(codes, np.full(40, 0.01, np.float32)), [2, 32],
                       act_scale=0.05, act_zero_point=128)
    share = 1.0 - codes.reshape(40, 8, 4).any(axis=2).mean()
    assert 0.75 <= share < 0.85  # between the crossovers without AMX and with it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = create_engine("openvino-sparse", path, batch_size=2)
    records = [w for w in caught if isinstance(w.message, KernelCrossoverWarning)]
    raised = [w.message for w in records]
    assert [layer.name for layer in engine.below_crossover] == (["layer"] if amx else [])
    assert len(raised) == (1 if amx else 0)
    if amx:
        assert Path(records[0].filename) == Path(__file__)  # it names the caller's line, not the runtime's
        message = str(raised[0])
        assert f"1 of the file's 1 sparse-kernel products have {share:.0%} zeros" in message
        assert "crossover (int8 85%)" in message and "layer" in message


def test_the_engine_says_why_it_is_unavailable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert not engine_status("openvino-sparse").available
    with pytest.raises(EngineUnavailableError, match="not built for this Python.*make install"):
        create_engine("openvino-sparse", tmp_path / "model.onnx")


@pytest.mark.slow
def test_without_a_compiler_the_build_leaves_the_reason_and_succeeds(tmp_path, monkeypatch) -> None:
    script = Path(__file__).parents[1] / "kernels" / "build.sh"
    done = subprocess.run([str(script), sys.executable, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "CXX": "no-such-c++"}, check=False)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / LIBRARY).exists()
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    status = engine_status("openvino-sparse")
    assert not status.available and "no C++ compiler (no-such-c++)" in status.reason


def test_another_engine_refuses_a_file_with_sparse_nodes(tmp_path) -> None:
    packed = pack_f32_csr(np.eye(4, dtype=np.float32))
    path = _layer_file(tmp_path / "l.onnx", packed, [1, 4])
    for engine in ("openvino", "onnxruntime"):
        with pytest.raises(EngineLoadError, match="only the 'openvino-sparse' engine runs"):
            create_engine(engine, path)


def test_the_int8_verification_runs_the_sparse_kernel_export_on_its_engine(tmp_path) -> None:
    """prune-and-bench checks every INT8 export on the engine that runs it, SparseLinear nodes included."""
    from vitsparse.bench.int8 import verify_formats

    manager, images, _ = _masked_vit(quantize=True)
    checks = verify_formats(manager.graph_module, manager.recipe, images, tmp_path, "vit")
    check = checks["sparse-kernels"]
    assert check["engine"] == "openvino-sparse" and check["images"] == 2
    assert check["max_abs_logit_diff"] < 0.2 and check["top1_agreement"] == 1.0
    model = onnx.load(str(tmp_path / "vit-qdq-sparse_kernels" / "model.onnx"))
    assert any(node.op_type == "SparseLinear" for node in model.graph.node)


# (with AMX-BF16 the engine warns that dense OpenVINO would be faster: the layers are below 95 %)
@pytest.mark.filterwarnings("ignore::vitsparse.runtime.openvino_sparse_engine.KernelCrossoverWarning")
def test_a_bf16_export_runs_its_layers_in_bfloat16_within_the_stated_tolerance(tmp_path) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    manager = PassManager(trace(small_vit(depth=2)), recipe=Recipe(base={"model": "test"}))
    manager.run(MagnitudePass(SparsityConfig(sparsity=0.9, pattern="1x4")))
    with torch.no_grad():
        expected = manager.graph_module(images).numpy()
    # (90 % all-zero pairs: below the default threshold where the CPU has AMX-BF16)
    config = ExportConfig(batch_size=2, sparse_kernels=True, sparse_precision="bf16",
                          sparse_min_sparsity=0.75)
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "artifact", config)
    assert result.meta["sparse_kernels"]["precision"] == "bf16" and result.meta["verification_limit"] == 0.1
    model = onnx.load(str(result.directory / "model.onnx"))
    formats = {attribute.s for node in model.graph.node if node.op_type == "SparseLinear"
               for attribute in node.attribute if attribute.name == "format"}
    assert formats == {b"bf16_1x2"}
    engine = create_engine("openvino-sparse", result.directory / "model.onnx", batch_size=2, precision="bf16")
    (logits,) = engine.run([images.numpy()])
    assert 1e-5 < np.abs(logits - expected).max() < config.bf16_atol


def test_the_microbenchmark_times_only_the_precisions_asked_for(tmp_path, capsys) -> None:
    from vitsparse.bench import kernel_speed

    output = tmp_path / "timings.json"
    assert kernel_speed.main(["--sparsities", "0.9", "--batches", "1", "--layers", "proj", "--rounds", "1",
                              "--seconds", "0.01", "--precisions", "int8,int8:bf16", "-o", str(output)]) == 0
    timings = json.loads(output.read_text())["timings"]
    assert {(t["precision"], t["sparsity"]) for t in timings} == {
        (precision, sparsity) for precision in ("int8", "int8:bf16") for sparsity in (None, 0.9)}
    printed = capsys.readouterr().out
    assert "| proj | 1 | int8 |" in printed and "| proj | 1 | int8:bf16 |" in printed
    with pytest.raises(SystemExit):
        kernel_speed.main(["--precisions", "int4"])
    assert "--precisions: choose from int8, int8:bf16, bf16, f32" in capsys.readouterr().err


def test_the_microbenchmarks_bf16_hint_pair_runs_the_kernel_node_in_bf16(core, tmp_path) -> None:
    """`int8:bf16` compiles the INT8 kernel node as `openvino-sparse:bf16` runs it: in bf16 where the CPU
    has BF16 (else OpenVINO keeps f32, as it does for the dense file beside it). The layer reads and
    writes bf16, and the node reads the model's input and feeds its output with no Convert between."""
    from vitsparse.bench import kernel_speed
    from vitsparse.runtime import openvino_engine

    path = kernel_speed.layer_models("proj", 1, [0.9], tmp_path)[("int8:bf16", 0.9)]
    compiled = kernel_speed.compile_layer(core, "int8:bf16", path, {"INFERENCE_NUM_THREADS": 1})
    (kernel,) = _kernel_ops(compiled)
    assert compiled.output(0).get_element_type().get_type_name() == "bf16"
    if "BF16" in openvino_engine.cpu_capabilities():
        assert _rt(kernel, "runtimePrecision") == "bf16"
        layers = {_rt(op, "layerType") for op in compiled.get_runtime_model().get_ordered_ops()}
        assert layers == {"Input", "Const", "Reference", "Output"}
    else:
        assert _rt(kernel, "runtimePrecision") == "f32"
    x = np.random.default_rng(0).standard_normal((kernel_speed.TOKENS, 384)).astype(np.float32)
    (y,) = compiled.create_infer_request().infer({0: kernel_speed.layer_input("int8:bf16", x)}).values()
    reference = kernel_speed.compile_layer(core, "int8", path, {"INFERENCE_NUM_THREADS": 1})
    (exact,) = reference.create_infer_request().infer({0: x}).values()
    widened = from_bf16_bits(np.asarray(y).view(np.uint16))
    assert np.abs(widened - exact).max() <= 0.05 * (np.abs(exact).max() + 1)
