"""Sparsity patterns (unstructured, N:M, 1xK) through the shared sparsity pass, and gradual schedules."""

from __future__ import annotations

import pytest
import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.pruners import (
    MagnitudePass,
    SparsityConfig,
    SparsityPass,
    check_mask_pattern,
    mask_sparsity,
    masked_modules,
    parse_pattern,
)
from vitsparse.pruners.patterns import NOfM, RowBlocks, lowest_removed
from vitsparse.pruners.schedule import GradualConfig, cubic_schedule, gradual_prune

from helpers import small_vit

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _manager(depth: int = 2) -> PassManager:
    return PassManager(trace(small_vit(depth=depth)), recipe=Recipe(base={"model": "test"}))


@pytest.mark.parametrize("spec,expected", [
    ("unstructured", "unstructured"), ("2:4", "2:4"), ("1:8", "1:8"), ("1x4", "1x4"), ("1×8", "1x8"),
])
def test_pattern_specs_parse_and_normalise(spec: str, expected: str) -> None:
    assert parse_pattern(spec).spec == expected


@pytest.mark.parametrize("spec,message", [
    ("5:4", "N must not exceed M"), ("0:4", "N >= 1"), ("4x1", "unknown sparsity pattern"),
    ("1x0", "block size must be >= 1"), ("blocky", "unknown sparsity pattern"),
])
def test_bad_pattern_specs_raise_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pattern(spec)


def test_n_of_m_keeps_the_n_best_of_every_group() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    keep = NOfM(2, 4).select(scores)
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]
    assert check_mask_pattern(keep, NOfM(2, 4)) and not check_mask_pattern(keep, NOfM(1, 4))


def test_row_blocks_remove_whole_blocks_by_their_summed_score() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 5.0],
                           [2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    keep = RowBlocks(4).select(scores, 2)  # block sums 4, 5 | 8, 3: the 3 and the 4 go
    assert keep.tolist() == [[False] * 4 + [True] * 4, [True] * 4 + [False] * 4]
    assert check_mask_pattern(keep, RowBlocks(4))
    assert not check_mask_pattern(torch.tensor([[True, False, True, True]]), RowBlocks(4))


def test_minus_infinity_marks_weights_that_must_go() -> None:
    scores = torch.tensor([5.0, -torch.inf, 1.0, 2.0])
    assert lowest_removed(scores, 2).tolist() == [True, False, False, True]


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.75), ("2:4", None), ("1:4", None),
                                              ("1x4", 0.75), ("1x4", 0.5)])
def test_magnitude_masks_obey_the_pattern_with_exact_counts(pattern: str, sparsity: float | None) -> None:
    manager = _manager()
    gm = manager.run(MagnitudePass(sparsity=sparsity, pattern=pattern))
    expected = parse_pattern(pattern).fixed_sparsity() if sparsity is None else sparsity
    layers = manager.recipe.passes[0].decisions["layers"]
    for name, module in masked_modules(gm).items():
        assert check_mask_pattern(module.weight_mask, parse_pattern(pattern)), name
        assert layers[name]["pruned"] == round(expected * module.weight.numel())
        assert int((module.weight == 0).sum()) == layers[name]["pruned"]
    assert manager.recipe.passes[0].params["pattern"] == parse_pattern(pattern).spec
    assert torch.isfinite(gm(X)).all()


def test_global_block_scope_keeps_the_overall_count_exact() -> None:
    manager = _manager()
    gm = manager.run(MagnitudePass(sparsity=0.6, pattern="1x4", scope="global"))
    modules = masked_modules(gm)
    total = sum(m.weight.numel() for m in modules.values())
    assert sum(int((~m.weight_mask).sum()) for m in modules.values()) == 4 * round(0.6 * total / 4)
    assert all(check_mask_pattern(m.weight_mask, RowBlocks(4)) for m in modules.values())
    assert len({round(s, 3) for s in mask_sparsity(gm).values()}) > 1


@pytest.mark.parametrize("settings,message", [
    (dict(pattern="2:4", sparsity=0.75), "fixes the sparsity at 0.5"),
    (dict(pattern="2:4", scope="global"), "use scope 'layer'"),
    (dict(sparsity=1.0), r"sparsity must lie in \[0, 1\)"),
    (dict(), "give a sparsity"),
    (dict(pattern="3:2"), "N must not exceed M"),
    (dict(saliency="hunch", sparsity=0.5), "unknown saliency 'hunch'"),
    (dict(sparsity=0.5, solver={"damp": 0.1}), r"unknown magnitude settings \['damp'\]"),
])
def test_bad_sparsity_configs_raise_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**settings)


def test_pattern_that_does_not_divide_the_input_size_is_refused() -> None:
    manager = PassManager(trace(small_vit(depth=1, embed_dim=198, num_heads=2)))
    with pytest.raises(ValueError, match="multiple of 4, got 198"):
        manager.run(MagnitudePass(pattern="1x4", sparsity=0.5))


def test_cubic_schedule_values() -> None:
    assert cubic_schedule(0.8, 1) == [0.8]
    steps = cubic_schedule(0.8, 4)
    assert steps == pytest.approx([0.8 * (1 - 0.75 ** 3), 0.8 * (1 - 0.5 ** 3), 0.8 * (1 - 0.25 ** 3), 0.8])
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False))  # rising, fastest at first
    assert steps[0] - 0 > steps[-1] - steps[-2]
    assert cubic_schedule(0.9, 2, initial=0.5) == pytest.approx([0.9 - 0.4 * 0.125, 0.9])


def test_gradual_schedule_hits_its_targets_at_the_stated_steps_and_masks_only_grow() -> None:
    manager = _manager()
    seen: list[tuple[int, float, dict]] = []

    def recover(gm, step: int) -> float:
        masks = {n: m.weight_mask.clone() for n, m in masked_modules(gm).items()}
        seen.append((step, sum(mask_sparsity(gm).values()) / len(masks), masks))
        return float(step)

    history = gradual_prune(manager, SparsityConfig(sparsity=0.8), GradualConfig(steps=3), recover)
    targets = cubic_schedule(0.8, 3)
    assert [h.target for h in history] == targets
    assert [h.recovery for h in history] == [1.0, 2.0, None]  # no recovery after the last step
    for h in history:
        assert h.reached == pytest.approx(h.target, abs=1e-3)
    for (_, _, earlier), (_, _, later) in zip(seen, seen[1:], strict=False):
        assert not any(bool((later[n] & ~earlier[n]).any()) for n in earlier)  # nothing comes back
    assert len(manager.recipe.passes) == 3
    assert [p.params["sparsity"] for p in manager.recipe.passes] == targets


@pytest.mark.parametrize("steps,message", [(0, "steps must be an integer >= 1"), (2.5, "integer")])
def test_bad_schedules_raise_clear_errors(steps, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradualConfig(steps=steps)
    with pytest.raises(ValueError, match="exceeds the final"):
        cubic_schedule(0.5, 3, initial=0.7)
    with pytest.raises(ValueError, match="cannot be reached in 3 steps"):
        gradual_prune(_manager(1), SparsityConfig(pattern="2:4"), GradualConfig(steps=3))


@pytest.mark.parametrize("saliency,pattern,sparsity", [
    ("magnitude", "unstructured", 0.75), ("magnitude", "2:4", None), ("magnitude", "1x4", 0.75),
    ("obs-layerwise", "unstructured", 0.75), ("obs-layerwise", "1x4", 0.5), ("obs-fisher", "2:4", None),
])
def test_the_exported_onnx_holds_exactly_the_masks(tmp_path, saliency, pattern, sparsity) -> None:
    import onnx
    from onnx import numpy_helper

    from vitsparse.compiler import export_artifact
    from vitsparse.runtime import inspect_onnx

    manager = _manager(depth=1)
    calibration = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    solver = {"num_grads": 16} if saliency == "obs-fisher" else {}
    gm = manager.run(SparsityPass(saliency=saliency, sparsity=sparsity, pattern=pattern, solver=solver,
                                  calibration=None if saliency == "magnitude" else calibration))
    export_artifact(gm, manager.recipe, tmp_path / "art")
    report = inspect_onnx(tmp_path / "art" / "model.onnx")
    graph = onnx.load(tmp_path / "art" / "model.onnx").graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    requested = parse_pattern(pattern).fixed_sparsity() if sparsity is None else sparsity
    for name, module in masked_modules(gm).items():
        keep = module.weight_mask.numpy().T  # MatMul weights are stored (in, out)
        found = [w for w in report.weights if w.layer_op == "MatMul" and stored[w.name].shape == keep.shape
                 and ((stored[w.name] != 0) == keep).all()]
        assert len(found) == 1, name
        assert found[0].numel - found[0].nonzeros == round(requested * keep.size)
