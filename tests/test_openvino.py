"""runtime/openvino_engine.py: OpenVINO matches torch (f32 to 1e-4, bf16 and INT8 to stated tolerances),
runs concurrent calls in its throughput mode, and refuses a missing install or a precision the CPU lacks."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

from vitsparse.bench.cli import main
from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, trace
from vitsparse.pruners import MagnitudePass, QuantConfig, QuantizePass
from vitsparse.runtime import (
    EngineUnavailableError,
    LayerMacs,
    UnsupportedPrecisionError,
    availability,
    check_engine_spec,
    create_engine,
    engine_status,
    inspect_onnx,
    openvino_engine,
)
from vitsparse.runtime.kernel_crossover import cpu_flags

from helpers import small_vit

OPENVINO = engine_status("openvino")
pytestmark = pytest.mark.skipif(not OPENVINO.available, reason=OPENVINO.reason)

F32_ATOL = 1e-4
# bf16 keeps 8 bits of mantissa: logits move by a few per cent of their range
BF16_RTOL = 0.05
# a QDQ file's INT8 layers against the fake-quantized torch model they came from: integer rounding
# differs from torch's float emulation by about a quantization step (ONNX Runtime's QDQ: 0.07 here)
INT8_ATOL = 0.2
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _export(tmp_path, sparsity: float = 0.0, quantize: bool | QuantConfig = False, depth: int = 2):
    """A small ViT (masked and/or quantized) exported at batch 2, and its torch logits on IMAGES[:2]."""
    manager = PassManager(trace(small_vit(depth=depth)), recipe=Recipe(base={"model": "test"}))
    if sparsity:
        manager.run(MagnitudePass(sparsity=sparsity))
    if quantize:
        config = quantize if isinstance(quantize, QuantConfig) else QuantConfig()
        manager.run(QuantizePass(config, calibration=IMAGES))
    directory = export_artifact(manager.graph_module, manager.recipe, tmp_path / "artifact",
                                ExportConfig(batch_size=2)).directory
    with torch.no_grad():
        expected = manager.graph_module(IMAGES[:2]).numpy()
    return directory / "model.onnx", expected


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_f32_matches_torch_within_1e4(tmp_path, sparsity: float) -> None:
    path, expected = _export(tmp_path, sparsity)
    engine = create_engine("openvino", path, batch_size=2, num_cores=1, precision="f32")
    (logits,) = engine.run([IMAGES[:2].numpy()])
    np.testing.assert_allclose(logits, expected, atol=F32_ATOL, rtol=0)
    described = engine.describe()
    assert (described["engine"], described["precision"]) == ("openvino", "f32")
    assert described["quantization"] is None


def test_without_a_precision_it_runs_f32_even_where_the_cpu_has_bf16(tmp_path) -> None:
    """OpenVINO's own choice is bf16 on such CPUs; an artifact must give the numbers its export verified."""
    path, expected = _export(tmp_path)
    engine = create_engine("openvino", path, batch_size=2)
    assert engine._config()["INFERENCE_PRECISION_HINT"] == "f32" and engine.effective_precision == "f32"
    np.testing.assert_allclose(engine.run([IMAGES[:2].numpy()])[0], expected, atol=F32_ATOL, rtol=0)


def test_threads_are_not_pinned_so_models_in_one_process_do_not_collide(tmp_path) -> None:
    """Pinned, a model's speed depended on which compiled model ran before it (see UNPINNED)."""
    path, _ = _export(tmp_path)
    for streams in (1, 2):
        engine = create_engine("openvino", path, batch_size=2, num_streams=streams)
        assert engine._compiled.get_property("ENABLE_CPU_PINNING") is False


def test_a_qdq_file_runs_in_int8_within_its_tolerance(tmp_path) -> None:
    path, expected = _export(tmp_path, quantize=True)
    engine = create_engine("openvino", path, batch_size=2, num_cores=1, precision="f32")
    (logits,) = engine.run([IMAGES[:2].numpy()])
    assert engine.describe()["quantization"] == "qdq"
    assert np.abs(logits - expected).max() < INT8_ATOL and np.abs(logits - expected).max() > 1e-6


def test_the_executed_graph_says_which_macs_ran_in_int8(tmp_path) -> None:
    float_path, _ = _export(tmp_path / "float")
    assert create_engine("openvino", float_path, batch_size=2).int8_mac_share == 0.0
    path, _ = _export(tmp_path / "int8", quantize=True)
    engine = create_engine("openvino", path, batch_size=2)
    report = inspect_onnx(path)
    precisions = openvino_engine.executed_precisions(engine._compiled)
    linears = [layer for layer in report.layers if layer.op_type == "MatMul"
               and any(kind in layer.name for kind in ("qkv", "proj", "fc1", "fc2"))]  # the quantized ones
    assert linears and all(precisions[layer.name] in ("u8", "i8") for layer in linears)
    assert precisions[next(layer.name for layer in report.layers if layer.op_type == "Conv")] == "f32"
    assert sum(layer.macs for layer in linears) / report.macs <= engine.int8_mac_share < 1
    assert engine.describe()["int8_mac_share"] == engine.int8_mac_share


@pytest.mark.skipif(not {"avx512_vnni", "amx_int8"} & set(cpu_flags()),
                    reason="OpenVINO runs INT8 attention only on CPUs with AVX-512 VNNI or AMX")
def test_attention_runs_in_int8_in_every_block_because_qkv_outputs_are_symmetric(tmp_path) -> None:
    """qkv's output quantizer feeds both attention MatMuls; at a zero point other than 128 OpenVINO ran
    them in f32 (this model's calibration gives 124-131 when asymmetric)."""
    def attention_precisions(path) -> list[str]:
        engine = create_engine("openvino", path, batch_size=2)
        precisions = openvino_engine.executed_precisions(engine._compiled)
        names = [layer.name for layer in inspect_onnx(path).layers if layer.op_type == "MatMul"
                 and not any(kind in layer.name for kind in ("qkv", "proj", "fc1", "fc2"))]
        assert len(names) == 8  # q·kᵀ and attention·v in each of 4 blocks
        return [precisions[name] for name in names]

    symmetric, _ = _export(tmp_path / "symmetric", quantize=True, depth=4)
    assert all(p in openvino_engine.INT8_PRECISIONS for p in attention_precisions(symmetric))
    asymmetric, _ = _export(tmp_path / "asymmetric", quantize=QuantConfig(symmetric_outputs=()), depth=4)
    assert "f32" in attention_precisions(asymmetric)


def test_int8_share_counts_macs_of_layers_that_ran_in_u8_or_i8() -> None:
    layers = [LayerMacs("a", "MatMul", (1, 4), 300), LayerMacs("b", "MatMul", (1, 4), 100),
              LayerMacs("c", "Conv", (1, 4), 100), LayerMacs("d", "Gemm", None, None)]
    share = openvino_engine.int8_share
    assert share(layers, {"a": "u8", "b": "i8", "c": "f32"}) == pytest.approx(0.8)
    assert share(layers, {"a": "bf16"}) == 0.0  # a layer missing from the executed graph is not INT8
    assert share(layers[3:], {"d": "u8"}) is None


def test_bf16_where_the_cpu_has_it(tmp_path) -> None:
    if "BF16" not in openvino_engine.cpu_capabilities():
        with pytest.raises(UnsupportedPrecisionError, match="cannot run OpenVINO in bf16: it has no BF16"):
            check_engine_spec("openvino:bf16")
        pytest.skip("this CPU has no bf16 instructions (refused with a clear error, checked above)")
    path, expected = _export(tmp_path)
    engine = create_engine("openvino", path, batch_size=2, precision="bf16")
    (logits,) = engine.run([IMAGES[:2].numpy()])
    assert engine.effective_precision == "bf16"
    assert np.abs(logits - expected).max() <= BF16_RTOL * (np.abs(expected).max() + 1)


def test_a_precision_the_cpu_cannot_run_is_a_clear_error(tmp_path, monkeypatch, capsys) -> None:
    path, _ = _export(tmp_path)
    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda: ("FP32", "INT8"))
    no_bf16 = r"no BF16 instructions .*FP32, INT8.*precision 'f32'"
    with pytest.raises(UnsupportedPrecisionError, match=no_bf16):
        create_engine("openvino", path, batch_size=2, precision="bf16")
    assert main(["bench", str(path), "-e", "openvino", "--precision", "bf16", "-b", "2", "-t", "0.1"]) == 2
    assert "cannot run OpenVINO in bf16" in capsys.readouterr().err
    assert main(["serve", str(path.parent), "--engine", "openvino", "--precision", "bf16",
                 "--batch-sizes", "2"]) == 2
    assert "cannot run OpenVINO in bf16" in capsys.readouterr().err
    with pytest.raises(UnsupportedPrecisionError, match="'openvino' runs float layers in f32 or bf16, not"):
        create_engine("openvino", path, batch_size=2, precision="fp8")
    for other in ("onnxruntime", "deepsparse"):
        if engine_status(other).available:
            with pytest.raises(UnsupportedPrecisionError, match=f"'{other}' runs float layers in f32"):
                create_engine(other, path, batch_size=2, precision="bf16")


def test_throughput_mode_runs_calls_from_several_threads(tmp_path) -> None:
    path, expected = _export(tmp_path)
    engine = create_engine("openvino", path, batch_size=2, num_streams=2)
    results: list[np.ndarray] = []

    def call() -> None:
        for _ in range(5):
            results.append(engine.run([IMAGES[:2].numpy()])[0])

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 15 and all(np.abs(r - expected).max() < F32_ATOL for r in results)
    assert engine.num_streams == 2


def test_an_absent_installation_is_a_clear_error(tmp_path, monkeypatch) -> None:
    path, _ = _export(tmp_path)
    real_find_spec = availability.importlib.util.find_spec
    monkeypatch.setattr(availability.importlib.util, "find_spec",
                        lambda name: None if name == "openvino" else real_find_spec(name))
    assert engine_status("openvino").reason == "OpenVINO is not installed (pip install openvino)"
    with pytest.raises(EngineUnavailableError, match="'openvino' is not available here: OpenVINO is not"):
        create_engine("openvino", path, batch_size=2)
    with pytest.raises(EngineUnavailableError, match="OpenVINO is not installed"):
        check_engine_spec("openvino:bf16")


def test_a_broken_installation_is_a_clear_error(tmp_path, monkeypatch) -> None:
    path, _ = _export(tmp_path)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(EngineUnavailableError, match="OpenVINO cannot be imported here"):
        openvino_engine.OpenVinoEngine(path, batch_size=2)  # past the install check: a broken wheel
