"""Static INT8: observers, the fake-quantized pass, the QDQ export and its operator-format rewrite."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch.utils.data import DataLoader, TensorDataset

from vitsparse.compiler import PassError, PassManager, Recipe, trace
from vitsparse.compiler.export import ExportConfig, ExportError, export_artifact, fold_for_export, write_onnx
from vitsparse.compiler.quantized_onnx import (
    QuantizedOnnxError,
    count_integer_layers,
    fold_weight_quantizers,
    to_operator_format,
)
from vitsparse.compiler.reference_ops import FAST_REFERENCE_OPS
from vitsparse.pruners import FinetuneConfig, MagnitudePass, finetune
from vitsparse.pruners.quant_observers import OBSERVERS, RangeStats, activation_qparams, symmetric_qparams
from vitsparse.pruners.quantize import QUANT_LAYERS, QuantConfig, QuantizePass

from helpers import small_vit

IMAGES = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _quantized(sparsity: float = 0.0, **config) -> PassManager:
    manager = PassManager(trace(small_vit(depth=2)), recipe=Recipe(base={"model": "test"}))
    if sparsity:
        manager.run(MagnitudePass(sparsity=sparsity))
    manager.run(QuantizePass(QuantConfig(**config), calibration=IMAGES))
    return manager


def _export_qdq(manager: PassManager, path) -> onnx.ModelProto:
    write_onnx(fold_for_export(manager.graph_module), path, ExportConfig(batch_size=2))
    model = fold_weight_quantizers(onnx.load(path))
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return ReferenceEvaluator(model, new_ops=FAST_REFERENCE_OPS).run(None, {"input": x.numpy()})[0]


def _assert_close_but_for_rounding_ties(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal to float rounding, except where a value one ulp from a rounding tie went the other way in
    one of the two (torch rounds x·(1/s), ONNX x/s; sums run in different orders): such a flip moves
    later logits by about one quantization step, so allow a few, and never a different top-1."""
    difference = np.abs(got - expected)
    assert np.median(difference) < 1e-5 and difference.max() < 0.05
    assert np.array_equal(got.argmax(1), expected.argmax(1))


def _stats(values: torch.Tensor) -> RangeStats:
    stats = RangeStats()
    stats.observe_span(values)
    stats.observe_histogram(values, 2048)
    return stats


def test_minmax_sees_everything_and_percentile_and_mse_clip_an_outlier() -> None:
    normal = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    values = torch.cat([normal, torch.tensor([60.0])])
    stats = _stats(values)
    assert OBSERVERS["minmax"](stats, 99.99) == (float(values.min()), 60.0)
    low, high = OBSERVERS["percentile"](stats, 99.99)
    assert 3.0 < high < 6.0 and -6.0 < low < -3.0
    mse_low, mse_high = OBSERVERS["mse"](stats, 99.99)
    assert mse_high < 60.0 and mse_low >= float(values.min())


def test_activation_ranges_always_hold_zero() -> None:
    scale, zero_point = activation_qparams(0.5, 2.0)  # a range above zero is widened down to it
    assert zero_point == 0 and scale == pytest.approx(2.0 / 255)
    scale, zero_point = activation_qparams(-1.0, 1.0)
    assert zero_point == 128 and scale == pytest.approx(2.0 / 255)
    assert activation_qparams(0.0, 0.0) == (1.0, 0)


def test_symmetric_ranges_centre_on_zero_point_128() -> None:
    assert symmetric_qparams(-0.5, 2.54) == (pytest.approx(0.02), 128)  # +127 steps reach the larger end
    assert symmetric_qparams(-2.54, 1.0) == (pytest.approx(0.02), 128)
    assert symmetric_qparams(0.5, 1.27) == (pytest.approx(0.01), 128)
    assert symmetric_qparams(0.0, 0.0) == (1.0, 128)


def test_qkv_outputs_are_symmetric_and_the_other_quantizers_asymmetric() -> None:
    manager = _quantized()
    layers = dict(manager.graph_module.named_modules())
    record = manager.recipe.passes[-1]
    assert record.params["symmetric_outputs"] == ["qkv"]
    for name, ranges in record.decisions["ranges"].items():
        layer = layers[name]
        out_low, out_high = ranges["output"]
        if name.endswith("qkv"):
            assert int(layer.out_zero_point) == 128
            assert float(layer.out_scale) == pytest.approx(max(-out_low, out_high) / 127)
        else:
            assert (float(layer.out_scale), int(layer.out_zero_point)) == pytest.approx(
                activation_qparams(out_low, out_high))
        assert (float(layer.act_scale), int(layer.act_zero_point)) == pytest.approx(
            activation_qparams(*ranges["input"]))
    others = [name for name in record.decisions["ranges"] if not name.endswith("qkv")]
    assert {int(layers[name].out_zero_point) for name in others} != {128}
    everything = _quantized(symmetric_outputs=("qkv", "proj", "fc1", "fc2")).graph_module
    assert {int(m.out_zero_point) for m in everything.modules() if isinstance(m, QUANT_LAYERS)} == {128}


def test_quantized_zeros_stay_zero_through_fine_tuning_export_and_the_rewrite(tmp_path) -> None:
    manager = _quantized(sparsity=0.75)
    loader = DataLoader(TensorDataset(IMAGES, torch.randint(0, 1000, (16,))), batch_size=8)
    tuned = finetune(manager.graph_module, loader, None, FinetuneConfig(epochs=1, lr=1e-2),
                     progress=False).model
    layers = {name: m for name, m in tuned.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert len(layers) == 8
    for layer in layers.values():
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
        assert torch.all(layer.quantized_weight()[~layer.weight_mask] == 0)
    manager.graph_module = tuned
    operator = to_operator_format(_export_qdq(manager, tmp_path / "model.onnx"))
    masks = [layer.weight_mask.numpy() for layer in layers.values()]
    codes = [numpy_helper.to_array(init) for init in operator.graph.initializer
             if init.name.endswith(".weight_int8")]
    assert len(codes) == len(masks)
    for mask, code in zip(masks, codes, strict=True):  # integer ops read (in, out): the transposed mask
        assert code.dtype == np.int8 and np.all(code[~mask.T] == 0) and np.count_nonzero(code) <= mask.sum()


def test_the_qdq_export_matches_the_fake_quantized_model(tmp_path) -> None:
    manager = _quantized(observer="percentile")
    model = _export_qdq(manager, tmp_path / "model.onnx")
    assert count_integer_layers(model) == {"qdq": 8, "integer": 0}
    x = IMAGES[:2]
    with torch.no_grad():
        expected = manager.graph_module(x).numpy()
    _assert_close_but_for_rounding_ties(_run(model, x), expected)


def test_the_operator_format_matches_the_qdq_model(tmp_path) -> None:
    manager = _quantized(targets=("patch_embed", "qkv", "proj", "fc1", "fc2", "head"))
    qdq = _export_qdq(manager, tmp_path / "model.onnx")
    operator = to_operator_format(fold_weight_quantizers(onnx.load(tmp_path / "model.onnx")))
    onnx.checker.check_model(operator)
    assert count_integer_layers(operator) == {"qdq": 0, "integer": 10}
    ops = {node.op_type for node in operator.graph.node}
    assert {"MatMulInteger", "ConvInteger"} <= ops
    weights = {init.name for init in operator.graph.initializer if init.data_type == onnx.TensorProto.INT8}
    assert not [n for n in operator.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    x = IMAGES[:2]
    reference, rewritten = _run(qdq, x), _run(operator, x)
    _assert_close_but_for_rounding_ties(rewritten, reference)


def test_replaying_the_recipe_installs_the_recorded_ranges() -> None:
    manager = _quantized(observer="mse")
    record = manager.recipe.passes[-1]
    assert record.name == "int8" and len(record.decisions["ranges"]) == 8
    assert record.stats["calibration_samples"] == 16
    replayed = PassManager(trace(small_vit(depth=2)))
    replayed.run(QuantizePass.from_record(record))
    with torch.no_grad():
        assert torch.equal(replayed.graph_module(IMAGES[:2]), manager.graph_module(IMAGES[:2]))


def test_a_record_from_before_symmetric_outputs_replays_every_output_asymmetric() -> None:
    record = copy.deepcopy(_quantized().recipe.passes[-1])
    del record.params["symmetric_outputs"]
    replayed = PassManager(trace(small_vit(depth=2)))
    replayed.run(QuantizePass.from_record(record))
    qkv = replayed.graph_module.get_submodule("blocks.0.attn.qkv")
    assert (float(qkv.out_scale), int(qkv.out_zero_point)) == pytest.approx(
        activation_qparams(*record.decisions["ranges"]["blocks.0.attn.qkv"]["output"]))


def test_bad_input_gives_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="calibration images"):
        QuantizePass()
    with pytest.raises(ValueError, match="holds no images"):
        QuantizePass(calibration=torch.empty(0, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown observer"):
        QuantConfig(observer="kl")
    with pytest.raises(ValueError, match="unknown target layer kinds"):
        QuantConfig(symmetric_outputs=("attn",))
    headless = PassManager(trace(small_vit(depth=2, num_classes=0)))
    with pytest.raises(PassError, match="no layer to quantize"):
        headless.run(QuantizePass(QuantConfig(targets=("head",)), calibration=IMAGES))
    manager = _quantized()
    with pytest.raises(PassError, match="already quantized"):
        manager.run(QuantizePass(calibration=IMAGES))
    dense = PassManager(trace(small_vit(depth=2)))
    write_onnx(fold_for_export(dense.graph_module), tmp_path / "fp32.onnx", ExportConfig())
    with pytest.raises(QuantizedOnnxError, match="no quantized"):
        to_operator_format(fold_weight_quantizers(onnx.load(tmp_path / "fp32.onnx")))


@pytest.mark.parametrize("quant_format", ["qdq", "operator"])
def test_export_artifact_writes_either_format_and_says_which(tmp_path, quant_format) -> None:
    manager = _quantized(sparsity=0.5)
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "int8",
                             ExportConfig(quant_format=quant_format))
    assert result.meta["quantization"] == {"format": quant_format, "layers": 8}
    assert result.max_abs_diff <= ExportConfig().quant_atol
    ops = {node.op_type for node in onnx.load(tmp_path / "int8" / "model.onnx").graph.node}
    assert ("MatMulInteger" in ops) == (quant_format == "operator")
    with pytest.raises(ExportError, match="quant_format"):
        ExportConfig(quant_format="int4")


def test_an_engine_refuses_an_int8_form_it_would_not_run_as_int8(tmp_path) -> None:
    from vitsparse.runtime.errors import EngineLoadError
    from vitsparse.runtime.quantized import check_int8_support, quantization_format

    manager = _quantized()
    qdq = _export_qdq(manager, tmp_path / "model.onnx")
    assert quantization_format(qdq) == "qdq"
    operator = to_operator_format(fold_weight_quantizers(onnx.load(tmp_path / "model.onnx")))
    assert quantization_format(operator) == "operator"
    check_int8_support("onnxruntime", qdq, "qdq.onnx")
    check_int8_support("deepsparse", operator, "operator.onnx")
    with pytest.raises(EngineLoadError, match="quant_format='operator'.*recipe file: int8_format: operator"):
        check_int8_support("deepsparse", qdq, "qdq.onnx")
    with pytest.raises(EngineLoadError, match="saturates.*recipe file: int8_format: qdq"):
        check_int8_support("onnxruntime", operator, "operator.onnx")


def _qdq_model(opset: int):
    """QuantizeLinear → DequantizeLinear per tensor (UINT8, with and without a zero point) and per
    channel along axis 1 (INT8)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    constants = {"s": np.array(0.5, np.float32), "zp": np.array(3, np.uint8),
                 "sc": rng.uniform(0.01, 0.1, 6).astype(np.float32),
                 "zpc": rng.integers(-4, 4, 6).astype(np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
             helper.make_node("QuantizeLinear", ["x", "sc", "zpc"], ["qc"], axis=1),
             helper.make_node("DequantizeLinear", ["qc", "sc", "zpc"], ["dqc"], axis=1),
             helper.make_node("QuantizeLinear", ["x", "s"], ["qu"])]
    outputs = [("q", TensorProto.UINT8), ("dq", TensorProto.FLOAT), ("qc", TensorProto.INT8),
               ("dqc", TensorProto.FLOAT), ("qu", TensorProto.UINT8)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_own_quantize_and_dequantize_equal_onnx_s_at_the_opset_every_onnx_implements() -> None:
    """The verifier's Q/DQ (exports write opset 14, which onnx >= 1.15 no longer runs) give onnx's own
    results at opset 19, per tensor and per channel, UINT8 and INT8, saturating."""
    x = (np.random.default_rng(2).standard_normal((2, 6, 5)) * 3).astype(np.float32)
    model = _qdq_model(19)
    ours = ReferenceEvaluator(model, new_ops=FAST_REFERENCE_OPS).run(None, {"x": x})
    theirs = ReferenceEvaluator(model).run(None, {"x": x})
    for mine, onnx_own in zip(ours, theirs, strict=True):
        assert mine.dtype == onnx_own.dtype and np.array_equal(mine, onnx_own)
    assert ours[4].min() == 0 and ours[2].max() == 127  # saturated


def test_own_quantize_rounds_ties_to_even_before_the_zero_point() -> None:
    """ONNX's QuantizeLinear (and torch's fake quantization, ONNX Runtime's kernel) round x / scale half
    to even, then add the zero point; onnx 1.14's reference evaluator added it first and rounded
    half up, so its verification differed from onnx >= 1.15's at ties. Ours is the specification's."""
    x = np.array([[[0.25], [0.75], [-1.25], [1.25], [0.0], [0.5]]], np.float32)  # x / 0.5: ±k + 0.5
    q = ReferenceEvaluator(_qdq_model(14), new_ops=FAST_REFERENCE_OPS).run(["q"], {"x": x})[0]
    assert q.ravel().tolist() == [3, 5, 1, 5, 3, 4]  # 0.5→0, 1.5→2, -2.5→-2, 2.5→2, 0→0, 1→1; plus 3


def test_the_fast_integer_reference_ops_equal_onnx_s_own() -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 5, 24)).astype(np.uint8)
    b = rng.integers(-127, 128, (24, 6)).astype(np.int8)
    x = rng.integers(0, 256, (2, 3, 8, 8)).astype(np.uint8)
    w = rng.integers(-127, 128, (4, 3, 4, 4)).astype(np.int8)
    constants = {"azp": np.array(131, np.uint8), "bzp": rng.integers(-3, 3, 6).astype(np.int8),
                 "xzp": np.array(7, np.uint8), "wzp": np.array(2, np.int8), "b": b, "w": w}
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "azp", "bzp"], ["y"]),
             helper.make_node("ConvInteger", ["x", "w", "xzp", "wzp"], ["z"], strides=[4, 4])]
    graph = helper.make_graph(
        nodes, "integer",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, a.shape),
         helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None),
         helper.make_tensor_value_info("z", TensorProto.INT32, None)],
        [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    feeds = {"a": a, "x": x}
    for fast, slow in zip(ReferenceEvaluator(model, new_ops=FAST_REFERENCE_OPS).run(None, feeds),
                          ReferenceEvaluator(model).run(None, feeds), strict=True):
        assert fast.dtype == np.int32 and np.array_equal(fast, slow)
