"""runtime/: engines agree with numpy, inspect_onnx counts zeros and MACs exactly, user mistakes are clear.

Every model here is built with onnx.helper and written to tmp_path; nothing depends on torch export.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitsparse.runtime import (
    ENGINE_TYPES,
    ENGINES,
    BatchSizeError,
    EngineUnavailableError,
    InputMismatchError,
    InvalidModelError,
    ModelNotFoundError,
    RuntimeInputError,
    UnknownEngineError,
    create_engine,
    engine_status,
    inspect_onnx,
)

AVAILABLE = [name for name in ENGINES if engine_status(name).available]
W1_ZEROS = 384  # of 16 x 32 = 512: 75 %


def save(path: Path, nodes: list, inputs: list, outputs: list, initializers: list) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8  # DeepSparse 1.8 reads IR <= 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_mlp(path: Path, batch: int | str = "batch") -> tuple[Path, dict[str, np.ndarray]]:
    """x [B, 16] -> MatMul w1 (16x32, 75 % zeros) -> Add b1 -> Relu -> MatMul w2 (32x10)."""
    rng = np.random.default_rng(0)
    w1 = (rng.uniform(0.5, 1.5, (16, 32)) * rng.choice([-1, 1], (16, 32))).astype(np.float32)
    w1.reshape(-1)[rng.permutation(w1.size)[:W1_ZEROS]] = 0.0
    weights = {"w1": w1, "b1": rng.standard_normal(32).astype(np.float32),
               "w2": rng.uniform(0.5, 1.5, (32, 10)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
         [numpy_helper.from_array(array, name) for name, array in weights.items()])
    return path, weights


def reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    return np.maximum(x @ w["w1"] + w["b1"], 0.0) @ w["w2"]


def baked_batch_model(path: Path) -> Path:
    """x [1, 16] reshaped through constants [1, 4, 4] and [1, 16]: it only runs at batch 1."""
    targets = {"s1": [1, 4, 4], "s2": [1, 16]}
    shapes = [numpy_helper.from_array(np.array(shape, np.int64), name) for name, shape in targets.items()]
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Reshape", ["b", "s2"], ["y"])]
    return save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], shapes)


def conv_gemm_model(path: Path) -> Path:
    """x [1, 3, 8, 8] -> Conv 4x3x3x3 -> Flatten -> Transpose(w) -> Gemm(transB) to 5 classes."""
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv[0] = 0.0  # 27 zeros of 108
    fc = rng.standard_normal((144, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Transpose", ["fc"], ["fc_t"], perm=[1, 0]),
             helper.make_node("Gemm", ["f", "fc_t"], ["y"], transB=1)]
    return save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
                [numpy_helper.from_array(conv, "conv"), numpy_helper.from_array(fc, "fc")])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    return tiny_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx")


@pytest.mark.parametrize("engine", AVAILABLE)
@pytest.mark.parametrize("exported_batch", ["batch", 1])
def test_engine_matches_numpy_at_any_batch_size(tmp_path, engine: str, exported_batch) -> None:
    path, weights = tiny_mlp(tmp_path / "mlp.onnx", batch=exported_batch)
    built = create_engine(engine, path, batch_size=3, num_cores=1)
    assert (built.name, built.batch_size, built.input_names, built.output_names) == (engine, 3, ["x"], ["y"])
    assert built.input_shapes == [(3, 16)]
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    (y,) = built.run([x])
    np.testing.assert_allclose(y, reference(x, weights), atol=1e-4)


def test_deepsparse_is_installed_wherever_it_can_be() -> None:
    """Engine tests are parametrised over the available engines; a broken DeepSparse install on
    Python < 3.12 (CI's Python) must fail here rather than quietly shrink that list."""
    if sys.version_info < (3, 12):
        assert "deepsparse" in AVAILABLE, engine_status("deepsparse").reason


def test_the_engines_vitsparse_depends_on_are_installed() -> None:
    """ONNX Runtime and OpenVINO are dependencies on every Python: tests that skip where an engine is
    missing (tests/test_openvino.py) must not skip quietly because an install broke."""
    for name in ("onnxruntime", "openvino"):
        assert name in AVAILABLE, engine_status(name).reason


def test_deepsparse_runs_the_whole_graph(mlp) -> None:
    if "deepsparse" not in AVAILABLE:  # only on Python >= 3.12, where DeepSparse 1.8 does not install
        pytest.skip(engine_status("deepsparse").reason)
    built = create_engine("deepsparse", mlp[0], batch_size=2, num_cores=1)
    assert built.fraction_of_supported_ops == 1.0
    assert built.describe()["fraction_of_supported_ops"] == 1.0


def test_onnxruntime_reports_no_supported_fraction(mlp) -> None:
    assert create_engine("onnxruntime", mlp[0]).fraction_of_supported_ops is None


def test_registry_names_the_engines_availability_knows() -> None:
    assert tuple(ENGINE_TYPES) == ENGINES


def test_inspect_counts_the_zeros_written(mlp) -> None:
    path, weights = mlp
    report = inspect_onnx(path)
    by_name = {w.name: w for w in report.weights}
    assert set(by_name) == {"w1", "b1", "w2"}  # all initializers listed, bias included
    assert (by_name["w1"].numel, by_name["w1"].nonzeros, by_name["w1"].sparsity) == (512, 128, 0.75)
    assert by_name["w1"].layer_op == "MatMul" and by_name["b1"].layer_op is None  # ndim < 2: not prunable
    assert (report.params, report.nonzero_params) == (864, 864 - W1_ZEROS)
    assert (report.prunable_params, report.prunable_nonzeros) == (832, 832 - W1_ZEROS)
    assert report.prunable_sparsity == W1_ZEROS / 832
    assert report.batch_size == 1 and report.macs == 16 * 32 + 32 * 10 and report.layers_without_macs == 0
    assert [layer.output_shape for layer in report.layers] == [(1, 32), (1, 10)]
    assert report.to_dict()["weights"][0]["name"] == "w1"


def test_inspect_counts_conv_and_gemm_macs(tmp_path) -> None:
    report = inspect_onnx(conv_gemm_model(tmp_path / "conv.onnx"))
    macs = {layer.op_type: layer.macs for layer in report.layers}
    assert macs == {"Conv": 4 * 6 * 6 * 27, "Gemm": 5 * 144}
    by_name = {w.name: w for w in report.weights}
    assert by_name["conv"].sparsity == 0.25 and by_name["fc"].layer_op == "Gemm"  # seen through Transpose


@pytest.mark.parametrize("engine", AVAILABLE)
def test_wrong_inputs_name_expected_and_got(mlp, engine: str) -> None:
    built = create_engine(engine, mlp[0], batch_size=3, num_cores=1)
    cases = [([np.zeros((2, 16), np.float32)], r"expected shape \(3, 16\) float32, got \(2, 16\) float32"),
             ([np.zeros((3, 15), np.float32)], r"got \(3, 15\) float32"),
             ([np.zeros((3, 16), np.float64)], r"expected shape \(3, 16\) float32, got \(3, 16\) float64"),
             ([], r"expected 1 input\(s\) \['x'\], got 0"),
             (np.zeros((3, 16), np.float32), "must be a list"),
             ([[[0.0] * 16] * 3], "must be a numpy array")]
    for inputs, message in cases:
        with pytest.raises(InputMismatchError, match=message):
            built.run(inputs)
    assert issubclass(InputMismatchError, ValueError)


@pytest.mark.parametrize("engine", AVAILABLE)
def test_bad_files_are_clear_errors(tmp_path, engine: str) -> None:
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.onnx").write_text("this is a text file, not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="ONNX model not found: .*missing.onnx"):
        create_engine(engine, tmp_path / "missing.onnx")
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    for name in ("random.onnx", "notes.onnx"):
        with pytest.raises(InvalidModelError, match=f"{name} is not a valid ONNX model"):
            create_engine(engine, tmp_path / name)
    with pytest.raises(InvalidModelError, match="no graph nodes"):
        create_engine(engine, tmp_path / "empty.onnx")
    with pytest.raises(InvalidModelError, match="is a directory"):
        create_engine(engine, tmp_path)
    with pytest.raises(InvalidModelError, match="random.onnx is not a valid ONNX model"):
        inspect_onnx(tmp_path / "random.onnx")


def test_a_model_failing_the_checker_is_a_clear_error(tmp_path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "broken",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(tmp_path / "b.onnx"))
    with pytest.raises(InvalidModelError, match="fails the ONNX checker"):
        create_engine("onnxruntime", tmp_path / "b.onnx")


@pytest.mark.parametrize("engine", AVAILABLE)
def test_a_batch_baked_into_constants_is_refused_before_the_engine_sees_it(tmp_path, engine: str) -> None:
    path = baked_batch_model(tmp_path / "baked.onnx")  # DeepSparse 1.8 aborts the process on this one
    with pytest.raises(BatchSizeError, match="bakes the batch size into constants.*use batch_size=1"):
        create_engine(engine, path, batch_size=4)
    (y,) = create_engine(engine, path, batch_size=1).run([np.full((1, 16), -1.0, np.float32)])
    assert y.shape == (1, 16) and not y.any()


def test_unknown_engine_and_bad_settings(mlp) -> None:
    with pytest.raises(UnknownEngineError, match="engine 'tensorrt'; choose from deepsparse, onnxruntime"):
        create_engine("tensorrt", mlp[0])
    for kwargs in ({"batch_size": 0}, {"num_cores": -1}, {"num_streams": 0}, {"batch_size": 1.5}):
        with pytest.raises(RuntimeInputError, match="must be a positive integer"):
            create_engine("onnxruntime", mlp[0], **kwargs)


def test_deepsparse_on_python_3_12_says_why(mlp, monkeypatch) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))
    with pytest.raises(EngineUnavailableError, match="'deepsparse' is not available here: .*Python < 3.12"):
        create_engine("deepsparse", mlp[0])


def test_engine_not_installed_says_how_to_install(mlp, monkeypatch) -> None:
    real = importlib.util.find_spec

    def hidden(name: str, *args):
        return None if name == "onnxruntime" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(EngineUnavailableError, match="ONNX Runtime is not installed .*pip install"):
        create_engine("onnxruntime", mlp[0])
