"""The layer-wise OBS saliency ("obs-layerwise", SparseGPT's solver): better reconstruction than magnitude,
exact per-layer counts, pattern-obeying masks that only grow, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitsparse.pruners.obs_layerwise  # noqa: F401  (registers the saliency)
from vitsparse.compiler import PassManager, find_vit_structure, trace
from vitsparse.models import build_model, digits_datasets, digits_loaders, evaluate
from vitsparse.pruners import (
    Calibration,
    MagnitudePass,
    SaliencyRequest,
    SparsityPass,
    check_mask_pattern,
    masked_modules,
    parse_pattern,
    select_targets,
)
from vitsparse.pruners.obs_layerwise import (
    LayerwiseObsSettings,
    block_prune_counts,
    gather_hessians,
    inverse_cholesky,
    layerwise_obs_masks,
    obs_prune,
)
from vitsparse.pruners.saliency import select_masks

from helpers import small_vit

ALL_LAYERS = ("patch_embed", "qkv", "proj", "fc1", "fc2", "head")
CALIB = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
CASES = [("unstructured", 0.5), ("unstructured", 0.75), ("2:4", 0.5), ("1x4", 0.5)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests work on tiny tensors: one thread is as fast, and on a busy shared CPU far faster than
    two (OpenMP workers waiting on each other made them 3-5x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _obs_pass(**settings) -> SparsityPass:
    settings.setdefault("calibration", CALIB)
    return SparsityPass(saliency="obs-layerwise", **settings)


def _correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=g) @ torch.randn(features, features, generator=g)


@pytest.mark.parametrize(("spec", "sparsity"), CASES)
def test_obs_reconstructs_a_linear_layer_better_than_magnitude(spec: str, sparsity: float) -> None:
    torch.manual_seed(0)
    layer, inputs = nn.Linear(64, 32), _correlated_inputs(1024, 64)
    hessian = gather_hessians(nn.Sequential(layer), ["0"], list(inputs.split(256)))["0"]
    torch.testing.assert_close(hessian, 2 / 1024 * inputs.T @ inputs, rtol=1e-4, atol=1e-3)
    pattern, weight = parse_pattern(spec), layer.weight.detach()
    units = pattern.units_to_prune(tuple(weight.shape), sparsity)
    corrected, keep = obs_prune(weight, hessian, pattern, units, block_size=16)
    magnitude = select_masks({"w": weight.abs()}, {"w": weight.shape}, sparsity, pattern, "layer")["w"]
    assert int((~keep).sum()) == int((~magnitude).sum()) == round(sparsity * weight.numel())
    assert check_mask_pattern(keep, pattern) and bool((corrected[~keep] == 0).all())
    obs_error = (inputs @ weight.T - inputs @ corrected.T).norm()
    magnitude_error = (inputs @ weight.T - inputs @ (weight * magnitude).T).norm()
    assert obs_error < 0.95 * magnitude_error


def test_dead_inputs_are_pruned_first_without_nans() -> None:
    inputs = _correlated_inputs(512, 32)
    inputs[:, :4] = 0
    weight = torch.randn(8, 32)
    corrected, keep = obs_prune(weight, 2 / 512 * inputs.T @ inputs, parse_pattern("unstructured"), 64)
    assert torch.isfinite(corrected).all() and int((~keep).sum()) == 64
    assert not keep[:, :4].any() and not corrected[:, :4].any()


def test_block_counts_add_up_exactly_and_keep_earlier_pruned_units() -> None:
    assert block_prune_counts([0, 0, 0], [10, 10, 5], 13) == [5, 5, 3]
    counts = block_prune_counts([4, 0, 1], [10, 10, 5], 18)
    assert sum(counts) == 18
    assert all(p <= c <= u for p, c, u in zip([4, 0, 1], counts, [10, 10, 5], strict=True))
    assert block_prune_counts([4, 0, 1], [10, 10, 5], 3) == [4, 0, 1]  # masks never shrink


@pytest.mark.parametrize(("spec", "sparsity"), [("unstructured", 0.6), ("2:4", 0.5), ("1x4", 0.5)])
def test_pass_hits_exact_counts_and_obeys_the_pattern(spec: str, sparsity: float) -> None:
    model = small_vit(depth=2, num_classes=10)
    gm = PassManager(trace(copy.deepcopy(model))).run(
        _obs_pass(sparsity=sparsity, pattern=spec, targets=ALL_LAYERS, solver={"block_size": 32}))
    masked = masked_modules(gm)
    assert len(masked) == 2 + 2 * 4
    pattern, changed = parse_pattern(spec), 0
    for name, module in masked.items():
        mask = module.weight_mask
        assert int((~mask).sum()) == round(sparsity * mask.numel()), name
        assert check_mask_pattern(mask, pattern), name
        assert bool((module.weight[~mask] == 0).all()), name
        original = model.get_submodule(name).weight
        changed += not torch.equal(module.weight[mask], original[mask])  # the OBS correction
    assert changed == len(masked)
    assert torch.isfinite(gm(X)).all()


@pytest.mark.parametrize("spec", ["unstructured", "1x4"])
def test_masks_only_grow_from_magnitude_50_to_obs_75(spec: str) -> None:
    manager = PassManager(trace(small_vit(depth=2, num_classes=10)))
    gm = manager.run(MagnitudePass(sparsity=0.5, pattern=spec))
    before = {name: m.weight_mask.clone() for name, m in masked_modules(gm).items()}
    gm = manager.run(_obs_pass(sparsity=0.75, pattern=spec, solver={"block_size": 64}))
    for name, module in masked_modules(gm).items():
        mask = module.weight_mask
        assert not (mask & ~before[name]).any(), name
        assert int((~mask).sum()) == round(0.75 * mask.numel()), name
        assert check_mask_pattern(mask, parse_pattern(spec)) and bool((module.weight[~mask] == 0).all())


def test_direct_call_restores_mode_and_device_and_returns_weight_shaped_masks() -> None:
    gm = trace(small_vit(depth=1, num_classes=10)).train()
    structure = find_vit_structure(gm)
    names = select_targets(structure, ALL_LAYERS)
    request = SaliencyRequest(gm, structure, names, 0.5, parse_pattern("unstructured"), "layer",
                              Calibration(((CALIB, None),)))
    masks = layerwise_obs_masks(request, LayerwiseObsSettings(samples=5, batch_size=2, device="cpu"))
    assert list(masks) == names and gm.training
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == gm.get_submodule(name).weight.shape


@pytest.mark.slow
def test_digits_vit_obs_beats_magnitude_and_sequential_stays_close_at_high_sparsity() -> None:
    base = build_model("digits-vit", pretrained=True, progress=False)
    test = digits_loaders(batch_size=256).test
    calibration = digits_datasets().train.tensors[0][:256]
    top1 = {}
    runs = [("magnitude", 0.7, {}), ("obs-layerwise", 0.7, {}), ("magnitude", 0.8, {}),
            ("obs-layerwise", 0.8, {}), ("obs-layerwise", 0.9, {}),
            ("obs-layerwise", 0.9, {"sequential": True})]
    for saliency, sparsity, solver in runs:
        extra = {"calibration": calibration, "solver": solver} if saliency != "magnitude" else {}
        obs_pass = SparsityPass(saliency=saliency, sparsity=sparsity, **extra)
        gm = PassManager(trace(copy.deepcopy(base))).run(obs_pass)
        top1[(saliency, sparsity, bool(solver))] = evaluate(gm, test, device="cpu").top1
    # digits-vit trains to different weights on CPUs with different kernels (AVX-512 vs AVX2) and under
    # numpy 2 (its float32 mean of the training pixels differs in the last bit), so the margins hold for
    # the three weights measured: AVX-512: 0.963 vs 0.926 at 70 %, 0.933 vs 0.744 at 80 %, 0.644 → 0.674
    # sequential at 90 %; AVX2: 0.967 vs 0.937, 0.937 vs 0.893, 0.581 → 0.663; AVX-512 under numpy 2:
    # 0.967 vs 0.937, 0.926 vs 0.811, 0.759 → 0.741 (sequential helps on two of three, never costs 3 pt)
    assert top1[("obs-layerwise", 0.7, False)] > top1[("magnitude", 0.7, False)] + 0.02, top1
    assert top1[("obs-layerwise", 0.8, False)] > top1[("magnitude", 0.8, False)] + 0.03, top1
    assert top1[("obs-layerwise", 0.9, True)] > top1[("obs-layerwise", 0.9, False)] - 0.03, top1


@pytest.mark.parametrize("solver", [{"damp": 0}, {"damp": -0.1}, {"damp": float("nan")}, {"samples": 0},
                                    {"batch_size": 0}, {"block_size": 2.5}, {"device": 3},
                                    {"device": "no-such-device"}, {"dampening": 0.1},
                                    {"sequential": "yes"}])
def test_bad_settings_are_refused_when_the_pass_is_made(solver: dict) -> None:
    with pytest.raises(ValueError, match="obs-layerwise|unknown"):
        _obs_pass(sparsity=0.5, solver=solver)


def test_global_scope_is_refused() -> None:
    with pytest.raises(ValueError, match="scope"):
        _obs_pass(sparsity=0.5, scope="global")


@pytest.mark.parametrize(("spec", "block_size"), [("1x4", 30), ("2:4", 6)])
def test_block_size_must_hold_whole_units(spec: str, block_size: int) -> None:
    manager = PassManager(trace(small_vit(depth=1, num_classes=10)))
    with pytest.raises(ValueError, match=f"block_size {block_size} must be a multiple of 4"):
        manager.run(_obs_pass(sparsity=0.5, pattern=spec, solver={"block_size": block_size}))


def test_zero_calibration_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="no images"):
        _obs_pass(sparsity=0.5, calibration=torch.empty(0, 3, 32, 32))
    gm = trace(small_vit(depth=1, num_classes=10))
    structure = find_vit_structure(gm)
    request = SaliencyRequest(gm, structure, select_targets(structure, ["fc1"]), 0.5,
                              parse_pattern("unstructured"), "layer", Calibration(()))
    with pytest.raises(ValueError, match="calibration images"):
        layerwise_obs_masks(request, LayerwiseObsSettings())


def test_grouped_conv_is_refused() -> None:
    model = small_vit(depth=1, num_classes=10)
    model.patch_embed.proj = nn.Conv2d(3, 192, 16, 16, groups=3)
    manager = PassManager(trace(model))
    with pytest.raises(ValueError, match="groups=3"):
        manager.run(_obs_pass(sparsity=0.5, targets=("patch_embed",)))


def test_a_hessian_that_is_not_positive_definite_names_the_layer() -> None:
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.*not positive definite"):
        inverse_cholesky(-torch.eye(8), 0.01, "blocks.0.mlp.fc1")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CI and dev machines have none; runs on a lent GPU machine")
def test_cuda_solver_matches_the_cpu_counts_and_returns_the_model_to_the_cpu() -> None:
    gm = PassManager(trace(small_vit(depth=2, num_classes=10))).run(
        _obs_pass(sparsity=0.75, pattern="1x4", targets=ALL_LAYERS, solver={"device": "cuda"}))
    for name, module in masked_modules(gm).items():
        mask = module.weight_mask
        assert module.weight.device.type == "cpu" and mask.device.type == "cpu", name
        assert int((~mask).sum()) == round(0.75 * mask.numel()), name
        assert check_mask_pattern(mask, parse_pattern("1x4")), name
        assert bool((module.weight[~mask] == 0).all())
    assert torch.isfinite(gm(X)).all()
