"""The export pass: ONNX matches torch, artifacts are written all or nothing."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from vitsparse.compiler import PassManager, Recipe, replace_module, trace
from vitsparse.compiler import export as export_module
from vitsparse.compiler.export import ARTIFACT_FILES, ExportConfig, ExportError, export_artifact

from helpers import small_vit


def _graph(depth: int = 2):
    recipe = Recipe(base={"model": "deit_tiny_patch16_224"})
    manager = PassManager(trace(small_vit(depth=depth)), recipe=recipe)
    return manager.graph_module, manager.recipe


def test_export_writes_a_verified_artifact(tmp_path) -> None:
    gm, recipe = _graph()
    result = export_artifact(gm, recipe, tmp_path / "art", ExportConfig(batch_size=2))
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == sorted(ARTIFACT_FILES)
    assert result.max_abs_diff < 1e-4
    meta = json.loads((tmp_path / "art" / "meta.json").read_text())
    assert meta["input_shape"] == [2, 3, 32, 32] and meta["opset"] == 14
    assert meta["macs"] > 0 and meta["params"] >= meta["nonzero_params"] > 0
    assert set(meta["layers"]) >= {"blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"}
    assert {"torch", "onnx", "timm"} <= set(meta["versions"])
    model = onnx.load(str(tmp_path / "art" / "model.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 32, 32]  # static batch size, as DeepSparse compiles it
    assert [p.name for p in tmp_path.iterdir()] == ["art"], "no staging folders left"


def test_export_folds_modules_that_offer_a_plain_equivalent(tmp_path) -> None:
    class DoubledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

        def export_module(self) -> nn.Linear:
            plain = nn.Linear(self.in_features, self.out_features)
            with torch.no_grad():
                plain.weight.copy_(self.weight * 2)
                plain.bias.copy_(self.bias * 2)
            return plain

    gm, recipe = _graph(depth=1)
    old = gm.get_submodule("blocks.0.mlp.fc2")
    doubled = DoubledLinear(old.in_features, old.out_features)
    doubled.load_state_dict(old.state_dict())
    replace_module(gm, "blocks.0.mlp.fc2", doubled)
    folded = export_module.fold_for_export(gm)
    assert type(folded.get_submodule("blocks.0.mlp.fc2")) is nn.Linear
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(folded(x), gm(x), atol=1e-5)
    assert export_artifact(gm, recipe, tmp_path / "art").max_abs_diff < 1e-4


@pytest.mark.parametrize("failure", ["mismatch", "interrupt"])
def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, failure: str) -> None:
    gm, recipe = _graph(depth=1)
    if failure == "mismatch":
        monkeypatch.setattr(export_module, "verify_onnx", lambda *a: 0.5)
        expected: type[BaseException] = ExportError
    else:
        def interrupted(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(export_module, "save_weights", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        export_artifact(gm, recipe, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_is_replaced_only_when_asked(tmp_path) -> None:
    gm, recipe = _graph(depth=1)
    export_artifact(gm, recipe, tmp_path / "art")
    with pytest.raises(ExportError, match="already exists"):
        export_artifact(gm, recipe, tmp_path / "art")
    export_artifact(gm, recipe, tmp_path / "art", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_an_existing_artifact_is_refused_before_any_export_work(tmp_path, monkeypatch) -> None:
    gm, recipe = _graph(depth=1)
    (tmp_path / "art").mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("exported before refusing the existing folder")

    monkeypatch.setattr(export_module, "write_onnx", no_work)
    with pytest.raises(ExportError, match="already exists"):
        export_artifact(gm, recipe, tmp_path / "art")


def test_bad_export_settings_are_clear_errors() -> None:
    with pytest.raises(ExportError, match="opset 18 is not supported"):
        ExportConfig(opset=18)
    with pytest.raises(ExportError, match="batch_size must be"):
        ExportConfig(batch_size=0)


def test_inspect_of_an_exported_masked_model_matches_its_masks(tmp_path) -> None:
    from vitsparse.compiler import count_costs, fold_for_export
    from vitsparse.pruners import MagnitudePass, mask_sparsity
    from vitsparse.runtime import inspect_onnx

    manager = PassManager(trace(small_vit(depth=2)), recipe=Recipe(base={"model": "deit_tiny"}))
    masked = manager.run(MagnitudePass(sparsity=0.75))
    export_artifact(masked, manager.recipe, tmp_path / "art")
    report = inspect_onnx(tmp_path / "art" / "model.onnx")
    folded = fold_for_export(masked)
    layers = [m for m in folded.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert report.prunable_params == sum(m.weight.numel() for m in layers)
    assert report.prunable_nonzeros == sum(int(m.weight.count_nonzero()) for m in layers)
    for name in mask_sparsity(masked):  # every masked layer reached the ONNX file with its zeros
        weight = folded.get_submodule(name).weight
        assert weight.numel() - int(weight.count_nonzero()) == round(0.75 * weight.numel())
    assert report.macs == count_costs(folded).macs


@pytest.mark.parametrize("stride,padding", [(4, 0), (2, 1)], ids=["patches", "overlapping-falls-back"])
def test_fast_reference_ops_match_onnx_own(tmp_path, stride: int, padding: int) -> None:
    """The verifier's numpy Conv, Erf and Pow give onnx's reference results (the fast path and the
    fallback: overlapping patches, a cube)."""
    from onnx.reference import ReferenceEvaluator

    from vitsparse.compiler.reference_ops import FAST_REFERENCE_OPS

    class Powers(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return y.pow(2) - 0.5 * y.pow(3)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=stride, padding=padding), torch.nn.GELU(),
                                Powers())
    x = torch.randn(2, 3, 16, 16)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=14,
                      input_names=["input"])
    own = ReferenceEvaluator(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    fast_evaluator = ReferenceEvaluator(str(tmp_path / "m.onnx"), new_ops=FAST_REFERENCE_OPS)
    fast = fast_evaluator.run(None, {"input": x.numpy()})[0]
    assert fast.shape == own.shape and abs(fast - own).max() < 1e-5


def test_artifacts_record_preprocessing_labels_and_checksum_through_passes(tmp_path) -> None:
    """What a server needs to classify an image file survives tracing, a pass and export."""
    import hashlib

    from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, trace
    from vitsparse.models import build_model
    from vitsparse.pruners import MagnitudePass

    model = build_model("deit_tiny_patch16_224", img_size=32)
    manager = PassManager(trace(model), recipe=Recipe(base={"model": "deit_tiny_patch16_224", "kwargs": {}}))
    manager.run(MagnitudePass(sparsity=0.5))
    meta = export_artifact(manager.graph_module, manager.recipe, tmp_path / "a",
                           ExportConfig(dynamic_batch=True)).meta
    assert meta["preprocessing"] == {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.9,
                                     "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225]}
    assert len(meta["labels"]) == 1000 and meta["labels"][:2] == ["tench", "goldfish"]
    assert meta["onnx_sha256"] == hashlib.sha256((tmp_path / "a" / "model.onnx").read_bytes()).hexdigest()
    assert meta["dynamic_batch"] is True
    replaced_head = trace(build_model("deit_tiny_patch16_224", img_size=32, num_classes=7))
    assert replaced_head.meta["vitsparse_serving"]["labels"] is None  # 1000 ImageNet names do not fit 7
