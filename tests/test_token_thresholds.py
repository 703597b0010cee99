"""Learned token-drop thresholds: the masked training form equals removing the tokens, its FLOPs model
equals counted MACs, learning moves the thresholds to the budget, keep counts replay, bad input."""

from __future__ import annotations

import pytest
import torch

from vitsparse.compiler import PassError, PassManager, Recipe, count_costs, find_vit_structure, replay, trace
from vitsparse.pruners import FinetuneConfig, TokenDropPass
from vitsparse.pruners.token_thresholds import (
    MaskedSoftmax,
    ThresholdConfig,
    flops_ratio,
    gated_copy,
    keep_counts_from_thresholds,
    learn_thresholds,
    token_costs,
    token_gates,
)

from helpers import STRUCTURE_IDS, STRUCTURE_VARIANTS, small_vit

WITH_CLASS_TOKEN = [v for v in STRUCTURE_VARIANTS if v[1].get("class_token", True)]
WITH_CLASS_TOKEN_IDS = [i for v, i in zip(STRUCTURE_VARIANTS, STRUCTURE_IDS, strict=True)
                        if v[1].get("class_token", True)]
LOCATIONS = (1, 2, 3)


def _model(fused: bool = True, name: str = "deit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    return small_vit(name, fused=fused, depth=4, img_size=64, **kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("variant", WITH_CLASS_TOKEN, ids=WITH_CLASS_TOKEN_IDS)
def test_thresholds_of_zero_keep_every_token(variant, fused: bool) -> None:
    name, kwargs = variant
    model = _model(fused, name, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = gated_copy(trace(model), LOCATIONS, (0.0, 0.0, 0.0)).eval()(x)
        assert torch.allclose(got, model(x), atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_masked_training_form_equals_removing_the_dropped_tokens(fused: bool) -> None:
    """One image: masking the dropped keys out of attention gives the class token what removing them
    (TopK with that image's counts) gives, and the FLOPs model gives the counted MACs."""
    model = _model(fused)
    graph = trace(model)
    gated = gated_copy(graph, LOCATIONS, (0.95, 0.98, 1.0)).eval()
    costs = token_costs(graph, find_vit_structure(graph))
    for seed in range(3):
        image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            masked = gated(image)
        kept = [int(g.kept.sum()) for g in token_gates(gated)]
        assert kept == sorted(kept, reverse=True) and kept[-1] < 16  # later stages keep a subset
        manager = PassManager(trace(model), recipe=Recipe())
        manager.run(TokenDropPass(1.0, LOCATIONS, kept=kept))
        with torch.no_grad():
            removed = manager.graph_module(image)
        assert torch.allclose(masked, removed, atol=1e-5)
        ratio = float(flops_ratio(gated, costs, LOCATIONS, 1))
        assert ratio == pytest.approx(manager.costs.macs / count_costs(graph).macs, rel=1e-6)


def test_masked_softmax_is_the_softmax_over_kept_keys_with_bounded_gradients() -> None:
    logits = torch.tensor([[[[0.0, 1.0, 9.0, 2.0]]]])  # key 2, far above the rest, is dropped
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], requires_grad=True)
    probs = MaskedSoftmax()(logits, mask)
    expected = torch.tensor([0.0, 1.0, 2.0]).softmax(dim=0)
    assert torch.allclose(probs[0, 0, 0, [0, 1, 3]], expected) and probs[0, 0, 0, 2] == 0
    probs[0, 0, 0, 0].backward()
    assert mask.grad.abs().max() <= 1.0  # unclamped, key 2's gradient would be about e^7 times larger


def test_learning_moves_the_thresholds_toward_the_flops_target() -> None:
    torch.manual_seed(0)
    model = _model()
    graph = trace(model)
    images, labels = torch.randn(64, 3, 64, 64), torch.randint(0, 1000, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    # a random model's scores lie within ±0.1 of 1, so θ takes smaller steps than on a trained one
    config = ThresholdConfig(target_ratio=0.6, locations=LOCATIONS, lr_scale=5.0)
    learned = learn_thresholds(graph, loader, config, FinetuneConfig(epochs=2, lr=1e-3), images[:32],
                               teacher=model, progress=False)
    assert learned.locations == LOCATIONS and len(learned.thresholds) == 3 and learned.steps == 8
    assert learned.thresholds != learned.initial
    assert abs(learned.final_ratio - 0.6) < 0.1
    assert any(not torch.equal(before[k], v) for k, v in graph.state_dict().items())  # trained jointly


def test_learned_keep_counts_are_the_calibration_mean_and_replay() -> None:
    model = _model()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    thresholds = (0.9, 1.0, 1.1)
    gated = gated_copy(trace(model), LOCATIONS, thresholds).eval()
    with torch.no_grad():
        gated(images)
    means = [round(float(g.kept.sum(dim=1).mean())) for g in token_gates(gated)]
    manager = PassManager(trace(model), recipe=Recipe())
    manager.run(TokenDropPass(thresholds=thresholds, locations=LOCATIONS, calibration=images))
    record = manager.recipe.passes[-1]
    assert record.decisions["kept_tokens"] == [max(1, m) for m in means]
    assert record.params["mode"] == "learned" and record.params["thresholds"] == list(thresholds)
    assert record.stats["calibration_samples"] == 6
    assert keep_counts_from_thresholds(trace(model), LOCATIONS, thresholds, images.split(4)) == tuple(
        record.decisions["kept_tokens"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # replay reads the counts from the recipe: no calibration images needed
        assert torch.equal(replay(model, manager.recipe)(x), manager.graph_module(x))


def test_bad_threshold_input_is_a_clear_error() -> None:
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(PassError, match=r"2 learned thresholds for 3 token-drop locations"):
        PassManager(trace(model)).run(TokenDropPass(thresholds=(1.0, 1.0), locations=LOCATIONS,
                                                    calibration=images))
    with pytest.raises(ValueError, match="2 thresholds for 3 token-drop locations"):
        gated_copy(trace(model), LOCATIONS, (1.0, 1.0))
    with pytest.raises(ValueError, match="either a keep_rate .* not both"):
        TokenDropPass(0.7, thresholds=(1.0,), calibration=images)
    with pytest.raises(ValueError, match="not neither"):
        TokenDropPass()
    with pytest.raises(ValueError, match="need calibration images"):
        TokenDropPass(thresholds=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"target_ratio must lie in \(0, 1\]"):
        ThresholdConfig(target_ratio=1.5)
    dropped = PassManager(trace(model))
    dropped.run(TokenDropPass(0.5, LOCATIONS))
    with pytest.raises(PassError, match="already drops tokens"):
        gated_copy(dropped.graph_module, LOCATIONS, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_adaptive_mode_keeps_each_images_tokens_and_exports_for_onnx_runtime(fused: bool, tmp_path) -> None:
    """Batch 1: each image keeps what its thresholds keep (as in training), on torch and on ONNX Runtime;
    a batch is refused with a message saying why."""
    pytest.importorskip("onnxruntime")
    from vitsparse.compiler import ExportConfig, export_artifact
    from vitsparse.runtime import create_engine

    model, thresholds = _model(fused), (0.95, 0.98, 1.0)
    gated = gated_copy(trace(model), LOCATIONS, thresholds).eval()
    manager = PassManager(trace(model), recipe=Recipe())
    manager.run(TokenDropPass(thresholds=thresholds, locations=LOCATIONS, adaptive=True))
    assert manager.recipe.passes[-1].params["mode"] == "adaptive"
    artifact = export_artifact(manager.graph_module, manager.recipe, tmp_path / "adaptive", ExportConfig())
    engine = create_engine("onnxruntime", artifact.directory / "model.onnx", batch_size=1, num_cores=1)
    counts = set()
    for seed in range(3):
        image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected, got = gated(image), manager.graph_module(image)
        counts.add(tuple(int(g.kept.sum()) for g in token_gates(gated)))
        assert torch.allclose(got, expected, atol=1e-5)
        assert abs(engine.run([image.numpy()])[0] - got.numpy()).max() < 1e-4
    assert len(counts) > 1  # the images kept different numbers of tokens
    with torch.no_grad():
        assert torch.equal(replay(model, manager.recipe)(image), got)
    with pytest.raises(AssertionError, match="one image at a time"):
        manager.graph_module(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="adaptive token dropping needs learned thresholds"):
        TokenDropPass(0.7, adaptive=True)
