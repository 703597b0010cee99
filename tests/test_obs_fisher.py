"""Empirical-Fisher block OBS ("obs-fisher"): the Woodbury inverse, greedy OBS, allocation and the pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitsparse.pruners.obs_fisher  # noqa: F401  (registers the saliency)
from vitsparse.compiler import PassManager, trace
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import (
    Calibration,
    SparsityPass,
    check_mask_pattern,
    masked_modules,
    parse_pattern,
)
from vitsparse.pruners.obs_fisher import (
    FisherObsSettings,
    greedy_obs,
    obs_closed_form,
    woodbury_update_,
)

from helpers import small_vit

FAST = {"num_grads": 8}  # small-model tests: few gradients keep them quick


def woodbury_inverse(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """(λI + (1/m) Σ g gᵀ)⁻¹ per block from gradients (m, N, B) by m rank-1 updates."""
    m, _, b = grads.shape
    hinv = torch.eye(b, dtype=grads.dtype).repeat(grads.shape[1], 1, 1) / damp
    for grad in grads:
        woodbury_update_(hinv, grad, m)
    return hinv


def _tiny_vit() -> nn.Module:
    """One block, width 64 (MLP 256): about 49 k target weights, so a whole pass takes well under a second."""
    return small_vit(depth=1, embed_dim=64, num_heads=2)


def _calibration(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _fisher_inverse(blocks: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A strongly correlated block Fisher (float64) and its inverse built by Woodbury updates."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(blocks, size, 4, generator=gen, dtype=torch.float64)  # gradients share 4 directions
    grads = torch.einsum("nbk,mnk->mnb", mix, torch.randn(3 * size, blocks, 4, generator=gen,
                                                            dtype=torch.float64))
    grads = grads + 0.1 * torch.randn(grads.shape, generator=gen, dtype=torch.float64)
    empirical = torch.einsum("mni,mnj->nij", grads, grads) / len(grads)
    fisher = 1e-2 * torch.eye(size, dtype=torch.float64) + empirical
    return fisher, woodbury_inverse(grads, 1e-2)


def _prune(model: nn.Module, **settings) -> nn.Module:
    settings.setdefault("solver", FAST)
    return PassManager(trace(model)).run(SparsityPass(saliency="obs-fisher", **settings))


def test_woodbury_inverse_matches_the_direct_inverse() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(12, 3, 8, generator=gen, dtype=torch.float64)  # m = 12 gradients, 3 blocks of 8
    direct = torch.linalg.inv(0.05 * torch.eye(8, dtype=torch.float64)
                              + torch.einsum("mni,mnj->nij", grads, grads) / 12)
    torch.testing.assert_close(woodbury_inverse(grads, 0.05), direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("unit", [1, 4])
def test_greedy_obs_steps_equal_the_closed_form_update(unit: int) -> None:
    fisher, hinv = _fisher_inverse(blocks=5, size=16)
    weights = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps = 8 // unit
    result = greedy_obs(weights, hinv, unit=unit, max_steps=steps)
    pruned = torch.zeros(5, 16 // unit, dtype=torch.bool).scatter_(1, result.order, True)
    pruned = pruned.repeat_interleave(unit, dim=1)
    closed = obs_closed_form(weights, hinv, pruned)
    torch.testing.assert_close(result.weights, closed, rtol=1e-8, atol=1e-10)
    assert int((closed == 0).sum()) == int(pruned.sum()) == 5 * 8
    # the step losses add up to the quadratic loss ½ δwᵀ F δw of the whole removal
    delta = (closed - weights).unsqueeze(-1)
    quadratic = 0.5 * (delta.transpose(1, 2) @ fisher @ delta).flatten()
    torch.testing.assert_close(result.losses.sum(1), quadratic, rtol=1e-6, atol=1e-10)


def test_obs_beats_magnitude_on_the_quadratic_loss() -> None:
    fisher, hinv = _fisher_inverse(blocks=64, size=16, seed=2)
    weights = torch.randn(64, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(new: torch.Tensor) -> float:
        delta = (new - weights).unsqueeze(-1)
        return float(0.5 * (delta.transpose(1, 2) @ fisher @ delta).sum())

    order = greedy_obs(weights, hinv, max_steps=8).order
    obs = obs_closed_form(weights, hinv, torch.zeros(64, 16, dtype=torch.bool).scatter_(1, order, True))
    smallest = weights.abs().argsort(dim=1)[:, :8]
    magnitude = weights.scatter(1, smallest, 0.0)
    assert int((obs == 0).sum()) == int((magnitude == 0).sum()) == 64 * 8
    assert loss(obs) < 0.5 * loss(magnitude)


@pytest.mark.parametrize("pattern, scope, sparsity", [
    ("unstructured", "layer", 0.6), ("unstructured", "global", 0.6), ("2:4", "layer", None),
    ("1x4", "layer", 0.5), ("1x4", "global", 0.5),
])
def test_pass_removes_exact_counts_in_the_pattern(pattern: str, scope: str, sparsity: float | None) -> None:
    model = _tiny_vit()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = {} if sparsity is None else {"sparsity": sparsity}
    gm = _prune(model, pattern=pattern, scope=scope, calibration=_calibration(), **settings)
    modules, spec = masked_modules(gm), parse_pattern(pattern)
    target = 0.5 if sparsity is None else sparsity
    total = removed = 0
    for name, module in modules.items():
        mask, weight = module.weight_mask, module.weight.detach()
        units = weight.numel() // spec.unit
        pruned_units = int((~mask).sum()) // spec.unit
        if scope == "layer":
            assert pruned_units == spec.units_to_prune(tuple(weight.shape), target)
        assert check_mask_pattern(mask, spec)
        assert torch.equal(weight == 0, ~mask)  # pruned weights exactly zero (kept ones got OBS updates)
        assert not torch.equal(weight[mask], original[f"{name}.weight"][mask])
        total, removed = total + units, removed + pruned_units
    assert removed == round(target * total)
    if scope == "global":
        assert len({round(m.sparsity(), 3) for m in modules.values()}) > 1
    assert not any(p.grad is not None for p in gm.parameters())
    assert torch.equal(gm.get_submodule("head").weight, original["head.weight"])


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.75), ("2:4", None)])
def test_masks_from_an_earlier_pass_are_kept(pattern: str, sparsity: float | None) -> None:
    manager = PassManager(trace(_tiny_vit()))
    first = manager.run(SparsityPass(saliency="magnitude", sparsity=0.5))
    before = {n: m.weight_mask.clone() for n, m in masked_modules(first).items()}
    settings = {} if sparsity is None else {"sparsity": sparsity}
    gm = manager.run(SparsityPass(saliency="obs-fisher", pattern=pattern, calibration=_calibration(),
                                  solver=FAST, **settings))
    for name, module in masked_modules(gm).items():
        assert not (module.weight_mask & ~before[name]).any()
        assert torch.equal(module.weight == 0, ~module.weight_mask)
        if pattern == "unstructured":
            assert int((~module.weight_mask).sum()) == round(0.75 * module.weight.numel())
        else:
            assert check_mask_pattern(module.weight_mask, parse_pattern(pattern))


def test_model_mode_and_device_are_restored() -> None:
    gm = trace(_tiny_vit())
    gm.train()
    pruned = PassManager(gm).run(SparsityPass(saliency="obs-fisher", sparsity=0.5, calibration=_calibration(),
                                              solver={**FAST, "device": "cpu"}))
    assert all(m.training for m in pruned.modules())
    assert all(p.requires_grad and p.grad is None for p in pruned.parameters())


@pytest.mark.slow
def test_digits_vit_one_shot_beats_magnitude() -> None:
    base = build_model("digits-vit", pretrained=True, progress=False)
    loaders = digits_loaders(batch_size=64)
    top1 = {}
    for saliency in ("magnitude", "obs-fisher"):
        extra = {"calibration": loaders.train} if saliency == "obs-fisher" else {}
        sparsity_pass = SparsityPass(saliency=saliency, sparsity=0.7, **extra)
        gm = PassManager(trace(copy.deepcopy(base))).run(sparsity_pass)
        top1[saliency] = evaluate(gm, loaders.test).top1
    print(f"digits-vit one-shot top-1 at 70% (scope layer): magnitude {top1['magnitude']:.4f}, "
          f"obs-fisher {top1['obs-fisher']:.4f}")
    # measured: magnitude 0.926, obs-fisher 0.978 (dense 0.981)
    assert top1["obs-fisher"] >= 0.95 and top1["obs-fisher"] >= top1["magnitude"] + 0.02


@pytest.mark.parametrize("settings, message", [
    ({"num_grads": 0}, "num_grads must be an integer >= 1"),
    ({"num_grads": 2.5}, "num_grads must be an integer >= 1"),
    ({"grad_batch_size": True}, "grad_batch_size must be an integer >= 1"),
    ({"block_size": 0}, "block_size must be an integer >= 1"),
    ({"damp": 0.0}, "damp must be a finite number > 0"),
    ({"damp": float("nan")}, "damp must be a finite number > 0"),
    ({"damp": "0.01"}, "damp must be a finite number > 0"),
    ({"device": "gpu0"}, "is not a torch device"),
    ({"bogus": 1}, "unknown obs-fisher settings"),
])
def test_bad_settings_raise_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsityPass(saliency="obs-fisher", sparsity=0.5, calibration=_calibration(), solver=settings)


@pytest.mark.parametrize("pattern, solver, message", [
    ("unstructured", {"block_size": 40},
     r"blocks.0.attn.qkv: obs-fisher block_size 40 must divide the layer's input size 64 .* "
     r"set solver=\{'block_size': 32\}"),
    ("1x4", {"block_size": 6}, r"block_size 6 must be a multiple of the unit 4 of pattern 1x4"),
    ("2:4", {"block_size": 2}, r"block_size 2 must be a multiple of M = 4 of pattern 2:4"),
])
def test_block_size_that_does_not_fit_names_layer_and_setting(pattern: str, solver: dict,
                                                               message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _prune(_tiny_vit(), pattern=pattern, sparsity=0.5, calibration=_calibration(), solver=solver)


def test_too_little_calibration_says_how_much_is_needed() -> None:
    with pytest.raises(ValueError, match="holds no images"):
        SparsityPass(saliency="obs-fisher", sparsity=0.5, calibration=torch.empty(0, 3, 32, 32))
    with pytest.raises(ValueError, match="needs calibration data"):
        SparsityPass(saliency="obs-fisher", sparsity=0.5)
    needed = r"needs num_grads × grad_batch_size = 8 × 2 = 16 calibration images, got 10"
    with pytest.raises(ValueError, match=needed):
        _prune(_tiny_vit(), sparsity=0.5, calibration=_calibration(10),
               solver={"num_grads": 8, "grad_batch_size": 2})
    pass_ = SparsityPass(saliency="obs-fisher", sparsity=0.5, calibration=_calibration(), solver=FAST)
    pass_.calibration = Calibration(())
    with pytest.raises(ValueError, match="got 0"):
        PassManager(trace(_tiny_vit())).run(pass_)


def test_settings_defaults() -> None:
    s = FisherObsSettings()
    assert (s.block_size, s.num_grads, s.grad_batch_size, s.damp, s.device) == (32, 64, 1, 0.01, None)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CI and dev machines have none; runs on a lent GPU machine")
def test_cuda_work_returns_the_model_to_the_cpu() -> None:
    model = _tiny_vit()
    gm = _prune(model, sparsity=0.6, scope="global", calibration=_calibration(),
                solver={**FAST, "device": "cuda"})
    modules = masked_modules(gm)
    assert all(p.device.type == "cpu" for p in gm.parameters())
    assert all(m.weight_mask.device.type == "cpu" for m in modules.values())
    total = sum(m.weight.numel() for m in modules.values())
    assert sum(int((m.weight == 0).sum()) for m in modules.values()) == round(0.6 * total)
    for module in modules.values():
        assert torch.equal(module.weight == 0, ~module.weight_mask)
