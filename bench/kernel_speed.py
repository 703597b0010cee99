"""Microbenchmark of vitsparse's sparse kernels against OpenVINO's dense MatMul, shape by shape.

Each DeiT-S linear (qkv, proj, fc1, fc2) at batch 1 and 16 (197 tokens per image) becomes one-layer
ONNX models: OpenVINO's dense MatMul in INT8 (QDQ), f32 and bf16, and a SparseLinear node at each
sparsity (random 1×4 blocks for INT8, 1×2 for bf16, random zeros for f32). The `mlp` row is the whole
INT8 MLP (fc1, GELU, fc2, as the QDQ export writes it) against the SparseMLP node the export makes of
it. `int8:bf16` times the INT8 files under OpenVINO's bf16 hint, the kernel node reading and writing
bf16 as `openvino-sparse:bf16` runs it: on a CPU with AVX-512 BF16 the fastest dense INT8. All models
of a shape are compiled on the same threads and timed in shuffled turns, so every ratio
compares calls made side by side. Each call's time is OpenVINO's own per-node profile summed
(`PERF_COUNT`, what benchmark_app -pc shows): the layer's work without the Python call around it,
which at batch 1 is as long as the layer.

    python -m vitsparse.bench.kernel_speed [--threads 2] [--sparsities 0.5,0.75,0.9] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vitsparse.compiler.sparse_onnx import (
    DOMAIN,
    make_node,
    pack_bf16_pairs,
    pack_f32_csr,
    pack_int8_blocks,
    to_bf16_bits,
    to_sparse_kernels,
)
from vitsparse.runtime.openvino_sparse_engine import bf16_kernel_io
from vitsparse.runtime.sparse_extension import add_extension

TOKENS = 197  # DeiT-S at 224 px: 196 patches and the class token
SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}  # (in, out)
MLP_HIDDEN = 1536  # "mlp": fc1, GELU and fc2 as one INT8 block, dense against one SparseMLP node
ACT_SCALE, ACT_ZERO_POINT = 0.05, 128


@dataclass
class Timing:
    layer: str
    batch: int
    precision: str  # one of PRECISIONS
    sparsity: float | None  # None: OpenVINO's dense MatMul
    median_ms: float  # of the nodes' summed time per call
    call_ms: float  # median wall time per Python call, for reference
    calls: int


def save_layer_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int],
                     out_features: int, path: Path, output_type: int = TensorProto.FLOAT) -> None:
    """An ONNX file of `nodes` reading float input "x" and writing "y" (float unless `output_type` says
    otherwise; opset 14 and SparseLinear's)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", output_type, [*x_shape[:-1], out_features])
    opsets = [helper.make_opsetid("", 14), helper.make_opsetid(DOMAIN, 1)]
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def dense_int8_model(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, n: int, path: Path) -> None:
    """x → QuantizeLinear → DequantizeLinear → MatMul(DequantizeLinear(codes)) → Add: what OpenVINO runs
    as an INT8 MatMul (the form vitsparse's QDQ exports take)."""
    out_features, in_features = codes.shape
    constants = {"s": np.float32(ACT_SCALE), "z": np.uint8(ACT_ZERO_POINT),
                 "w": np.ascontiguousarray(codes.T), "ws": scale.astype(np.float32),
                 "wz": np.zeros(out_features, np.int8), "b": bias}
    inits = [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    save_layer_model(nodes, inits, [n, in_features], out_features, path)


def dense_f32_model(weight: np.ndarray, bias: np.ndarray, n: int, path: Path) -> None:
    inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    save_layer_model(nodes, inits, [n, weight.shape[1]], weight.shape[0], path)


def qdq_mlp_model(fc1_codes: np.ndarray, fc2_codes: np.ndarray, n: int, seed: int = 0) -> onnx.ModelProto:
    """An INT8 MLP as vitsparse's QDQ export writes one: x → Q/DQ → fc1 → Q/DQ → + bias → GELU (erf, as
    torch exports it) → Q/DQ → fc2 → Q/DQ → + bias, weights as DequantizeLinear of [out, in] codes."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qdq(x: str, name: str, scale: float, zero_point: int) -> str:
        args = [const(f"{name}.s", np.float32(scale)), const(f"{name}.z", np.uint8(zero_point))]
        nodes.append(helper.make_node("QuantizeLinear", [x, *args], [f"{name}.q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", *args], [f"{name}.dq"]))
        return f"{name}.dq"

    def linear(x: str, name: str, codes: np.ndarray) -> str:
        weight = [const(f"{name}.w", np.ascontiguousarray(codes.T)), const(f"{name}.ws", np.float32(0.002))]
        nodes.append(helper.make_node("DequantizeLinear", weight, [f"{name}.wd"]))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.wd"], [f"{name}.mm"]))
        bias = const(f"{name}.b", rng.standard_normal(codes.shape[0]).astype(np.float32) * 0.1)
        out = qdq(f"{name}.mm", f"{name}.out", 0.05, 128)
        nodes.append(helper.make_node("Add", [out, bias], [f"{name}.y"]))
        return f"{name}.y"

    h = linear(qdq("x", "in", ACT_SCALE, ACT_ZERO_POINT), "fc1", fc1_codes)
    nodes += [helper.make_node("Div", [h, const("sqrt2", np.float32(np.sqrt(2)))], ["gelu.div"]),
              helper.make_node("Erf", ["gelu.div"], ["gelu.erf"]),
              helper.make_node("Add", ["gelu.erf", const("one", np.float32(1))], ["gelu.add"]),
              helper.make_node("Mul", [h, "gelu.add"], ["gelu.mul"]),
              helper.make_node("Mul", ["gelu.mul", const("half", np.float32(0.5))], ["gelu.out"])]
    y = linear(qdq("gelu.out", "hidden", 0.02, 10), "fc2", fc2_codes)
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, fc1_codes.shape[1]])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, fc2_codes.shape[0]])
    graph = helper.make_graph(nodes, "mlp", [x_info], [y_info], inits)
    # opset 19: the newest onnx's reference evaluator runs QuantizeLinear from 19 on
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def mlp_models(batch: int, sparsities: list[float], folder: Path, seed: int = 0
               ) -> dict[tuple[str, float | None], Path]:
    """("int8", sparsity or None) -> the DeiT-S MLP at that batch size, dense or as a SparseMLP node."""
    rng = np.random.default_rng(seed)
    embed = SHAPES["proj"][0]
    fc1 = rng.integers(-127, 128, (MLP_HIDDEN, embed)).astype(np.int8)
    fc2 = rng.integers(-127, 128, (embed, MLP_HIDDEN)).astype(np.int8)
    files = {("int8", None): folder / f"mlp-b{batch}-int8-dense.onnx"}
    onnx.save(qdq_mlp_model(fc1, fc2, batch * TOKENS), str(files[("int8", None)]))
    for sparsity in sparsities:
        model = qdq_mlp_model((fc1 * block_mask(rng, *fc1.shape, sparsity)).astype(np.int8),
                              (fc2 * block_mask(rng, *fc2.shape, sparsity)).astype(np.int8), batch * TOKENS)
        to_sparse_kernels(model, min_sparsity=0.0)
        files[("int8", sparsity)] = folder / f"mlp-b{batch}-int8-{sparsity}.onnx"
        onnx.save(model, str(files[("int8", sparsity)]))
    return files


def sparse_model(packed, n: int, path: Path, **attributes) -> None:
    node, inits = make_node("layer", "x", "y", packed, **attributes)
    save_layer_model([node], inits, [n, packed.cols], packed.rows, path)


def block_mask(rng: np.random.Generator, rows: int, cols: int, sparsity: float, width: int = 4) -> np.ndarray:
    """A random mask keeping round((1 - sparsity) × blocks) 1×width blocks along the input channel."""
    blocks = rows * cols // width
    keep = np.zeros(blocks, bool)
    keep[rng.choice(blocks, size=round((1 - sparsity) * blocks), replace=False)] = True
    return np.repeat(keep.reshape(rows, cols // width), width, axis=1)


def element_mask(rng: np.random.Generator, rows: int, cols: int, sparsity: float) -> np.ndarray:
    keep = np.zeros(rows * cols, bool)
    keep[rng.choice(rows * cols, size=round((1 - sparsity) * rows * cols), replace=False)] = True
    return keep.reshape(rows, cols)


PRECISIONS = ("int8", "int8:bf16", "bf16", "f32")
BF16_HINT = ("int8:bf16", "bf16")  # compiled with OpenVINO's bf16 precision hint, the others with f32


def with_bf16_hint_twins(files: dict[tuple[str, float | None], Path]) -> dict[tuple[str, float | None], Path]:
    """`files` and, for each INT8 file, the same file under precision `int8:bf16`."""
    return {**files, **{("int8:bf16", sparsity): path for (precision, sparsity), path in files.items()
                        if precision == "int8"}}


def layer_models(layer: str, batch: int, sparsities: list[float], folder: Path, seed: int = 0
                 ) -> dict[tuple[str, float | None], Path]:
    """(precision, sparsity or None) -> an ONNX file of that layer at that batch size."""
    if layer == "mlp":
        return with_bf16_hint_twins(mlp_models(batch, sparsities, folder, seed))
    rng = np.random.default_rng(seed)
    in_features, out_features = SHAPES[layer]
    n = batch * TOKENS
    codes = rng.integers(-127, 128, (out_features, in_features)).astype(np.int8)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    scale = np.full(out_features, 0.002, np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    files: dict[tuple[str, float | None], Path] = {}

    def path(name: str) -> Path:
        return folder / f"{layer}-b{batch}-{name}.onnx"

    files[("int8", None)] = path("int8-dense")
    dense_int8_model(codes, scale, bias, n, files[("int8", None)])
    files[("f32", None)] = files[("bf16", None)] = path("f32-dense")
    dense_f32_model(weight, bias, n, files[("f32", None)])
    for sparsity in sparsities:
        masked = (codes * block_mask(rng, out_features, in_features, sparsity)).astype(np.int8)
        files[("int8", sparsity)] = path(f"int8-{sparsity}")
        sparse_model(pack_int8_blocks(masked, ACT_SCALE * scale, bias), n, files[("int8", sparsity)],
                     act_scale=ACT_SCALE, act_zero_point=ACT_ZERO_POINT)
        files[("bf16", sparsity)] = path(f"bf16-{sparsity}")
        pairs = weight * block_mask(rng, out_features, in_features, sparsity, width=2)
        sparse_model(pack_bf16_pairs(pairs, bias), n, files[("bf16", sparsity)])
        files[("f32", sparsity)] = path(f"f32-{sparsity}")
        sparse_model(pack_f32_csr(weight * element_mask(rng, out_features, in_features, sparsity), bias), n,
                     files[("f32", sparsity)])
    return with_bf16_hint_twins(files)


def node_seconds(request) -> float:
    """The executed nodes' time in the last call, from OpenVINO's profile."""
    return sum(info.real_time.total_seconds() for info in request.get_profiling_info()
               if info.status == info.Status.EXECUTED)


def time_side_by_side(compiled: dict, inputs: dict, rounds: int, seconds: float) -> dict:
    """Per compiled model: (median node ms, median call ms, calls), timed in shuffled turns of `seconds`
    on its input in `inputs`."""
    requests = {key: model.create_infer_request() for key, model in compiled.items()}
    for key, request in requests.items():
        request.infer({0: inputs[key]}, share_inputs=True, share_outputs=True)
    nodes: dict = {key: [] for key in requests}
    calls: dict = {key: [] for key in requests}
    order = list(requests)
    for _ in range(rounds):
        random.shuffle(order)
        for key in order:
            request, deadline = requests[key], time.perf_counter() + seconds
            while True:
                start = time.perf_counter()
                request.infer({0: inputs[key]}, share_inputs=True, share_outputs=True)
                end = time.perf_counter()
                calls[key].append(end - start)
                nodes[key].append(node_seconds(request))
                if time.perf_counter() >= deadline:
                    break
    return {key: (statistics.median(nodes[key]) * 1e3, statistics.median(calls[key]) * 1e3, len(calls[key]))
            for key in requests}


def compile_layer(core, precision: str, path: Path, config: dict):
    """`path` compiled for `precision`: under the bf16 hint for BF16_HINT. For `int8:bf16` the layer
    reads and writes bf16 at its boundary, as it does between bf16 neighbours inside a model, and the
    INT8 kernel node reads and writes bf16."""
    import openvino

    network = core.read_model(str(path))
    if precision == "int8:bf16":
        steps = openvino.preprocess.PrePostProcessor(network)
        steps.input().tensor().set_element_type(openvino.Type.bf16)
        steps.output().tensor().set_element_type(openvino.Type.bf16)
        network = steps.build()
        bf16_kernel_io(network)
    hint = "bf16" if precision in BF16_HINT else "f32"
    return core.compile_model(network, "CPU", {**config, "INFERENCE_PRECISION_HINT": hint})


def layer_input(precision: str, x: np.ndarray):
    """x as `precision`'s layer reads it: for `int8:bf16` a bf16 openvino.Tensor, rounded to nearest even."""
    if precision != "int8:bf16":
        return x
    import openvino

    tensor = openvino.Tensor(openvino.Type.bf16, list(x.shape))
    tensor.data.view(np.uint16)[...] = to_bf16_bits(x)
    return tensor


def run(threads: int, sparsities: list[float], batches: list[int], layers: list[str], rounds: int,
        seconds: float, precisions: tuple[str, ...] = PRECISIONS) -> list[Timing]:
    import openvino

    core = openvino.Core()
    add_extension(core)
    results: list[Timing] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            for layer in layers:
                files = {key: path for key, path in layer_models(layer, batch, sparsities, Path(tmp)).items()
                         if key[0] in precisions}
                config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                          "ENABLE_CPU_PINNING": False, "PERF_COUNT": True}
                compiled = {key: compile_layer(core, key[0], path, config) for key, path in files.items()}
                in_features = SHAPES["proj" if layer == "mlp" else layer][0]
                x = np.random.default_rng(1).standard_normal((batch * TOKENS, in_features)).astype(np.float32)
                inputs = {key: layer_input(key[0], x) for key in compiled}
                medians = time_side_by_side(compiled, inputs, rounds, seconds)
                for (precision, sparsity), (node_ms, call_ms, calls) in medians.items():
                    results.append(Timing(layer, batch, precision, sparsity, node_ms, call_ms, calls))
                print(f"  timed {layer} at batch {batch}", file=sys.stderr, flush=True)
    return results


def speedups(results: list[Timing]) -> list[dict]:
    """Per sparse timing: its speed-up over OpenVINO's dense MatMul of the same layer, batch and
    precision (and, for INT8, over dense bf16 too)."""
    dense = {(t.layer, t.batch, t.precision): t.median_ms for t in results if t.sparsity is None}
    rows = []
    for t in results:
        if t.sparsity is None:
            continue
        row = {"layer": t.layer, "batch": t.batch, "precision": t.precision, "sparsity": t.sparsity,
               "sparse_ms": t.median_ms, "dense_ms": dense[(t.layer, t.batch, t.precision)]}
        row["speedup"] = row["dense_ms"] / t.median_ms
        rows.append(row)
    return rows


def crossover(rows: list[dict], precision: str, batch: int, layer: str) -> float | None:
    """The sparsity where the sparse kernel starts to beat dense, interpolated linearly between the
    measured points; None when it never does (1.0 would be beyond the range measured)."""
    points = sorted((r["sparsity"], r["speedup"]) for r in rows
                    if (r["precision"], r["batch"], r["layer"]) == (precision, batch, layer))
    if not points or points[-1][1] < 1.0:
        return None
    if points[0][1] >= 1.0:
        return points[0][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if v0 < 1.0 <= v1:
            return s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0)
    return None


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | batch | precision | dense ms | " +
             " | ".join(f"{s:.0%} ms (×)" for s in sorted({r['sparsity'] for r in rows})) + " | crossover |",
             "|---|---|---|---|" + "---|" * len({r["sparsity"] for r in rows}) + "---|"]
    keys = {(r["layer"], r["batch"], r["precision"]) for r in rows}
    for key in sorted(keys, key=lambda k: (k[1], k[0], k[2])):
        mine = sorted((r for r in rows if (r["layer"], r["batch"], r["precision"]) == key),
                      key=lambda r: r["sparsity"])
        point = crossover(rows, key[2], key[1], key[0])
        cells = [f"{r['sparse_ms']:.3f} ({r['speedup']:.2f}×)" for r in mine]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mine[0]['dense_ms']:.3f} | " + " | ".join(cells) +
                     f" | {'never' if point is None else f'{point:.0%}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--layers", default=",".join([*SHAPES, "mlp"]))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.2, help="per model per round")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help=f"kernels to time, each against the dense MatMul in its precision "
                             f"(default {','.join(PRECISIONS)})")
    parser.add_argument("-o", "--output", type=Path, help="write the timings here as JSON")
    args = parser.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    precisions = tuple(args.precisions.split(","))
    if not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)}, got {args.precisions!r}")
    results = run(args.threads, sparsities, [int(b) for b in args.batches.split(",")], args.layers.split(","),
                  args.rounds, args.seconds, precisions)
    rows = speedups(results)
    print(markdown(rows))
    if args.output:
        report = {"isa": os.environ.get("VITSPARSE_KERNEL_ISA", "best"),
                  "timings": [asdict(t) for t in results], "speedups": rows}
        args.output.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
