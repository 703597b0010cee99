"""The shared sparsity pass around its saliencies: failures leave nothing half-done, calibration is
read once and no more than needed, and bad input is a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vitsparse.pruners.obs_layerwise as obs_layerwise
from vitsparse.bench.methods import METHODS
from vitsparse.compiler import PassManager, trace
from vitsparse.pruners import (
    FinetuneConfig,
    MagnitudePass,
    SparsityConfig,
    SparsityPass,
    finetune,
    make_calibration,
    masked_modules,
)
from vitsparse.pruners.schedule import GradualConfig, gradual_prune

from helpers import small_vit

IMAGES = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _manager() -> PassManager:
    return PassManager(trace(small_vit(depth=2)))


def test_a_solver_failing_half_way_puts_the_weights_back(monkeypatch) -> None:
    manager = _manager()
    before = {k: v.clone() for k, v in manager.graph_module.state_dict().items()}
    calls = {"n": 0}
    real = obs_layerwise.inverse_cholesky

    def fail_on_the_fifth_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ValueError("planted failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(obs_layerwise, "inverse_cholesky", fail_on_the_fifth_layer)
    with pytest.raises(ValueError, match="planted failure"):
        manager.run(SparsityPass(saliency="obs-layerwise", sparsity=0.5, calibration=IMAGES))
    after = manager.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # blocks.0 had been corrected already
    assert not masked_modules(manager.graph_module) and not manager.recipe.passes


def test_calibration_reads_no_more_batches_than_the_solver_uses() -> None:
    consumed = []

    def batches():
        for index in range(100):
            consumed.append(index)
            yield IMAGES[:4]

    sparsity_pass = SparsityPass(saliency="obs-layerwise", sparsity=0.5, solver={"samples": 8},
                                 calibration=batches())
    assert sparsity_pass.calibration.num_samples == 8 and len(consumed) == 2


def test_gradual_pruning_reads_a_generator_once_for_every_step() -> None:
    manager = _manager()
    history = gradual_prune(manager, SparsityConfig(saliency="obs-layerwise", sparsity=0.6),
                            GradualConfig(steps=3), calibration=(IMAGES[i:i + 4] for i in range(0, 16, 4)))
    assert [round(h.reached, 3) for h in history] == [round(h.target, 3) for h in history]
    assert [p.stats["calibration_samples"] for p in manager.recipe.passes] == [16, 16, 16]


def test_a_block_pattern_cannot_grow_a_finer_mask() -> None:
    manager = _manager()
    manager.run(MagnitudePass(sparsity=0.5))
    with pytest.raises(ValueError, match="already has a mask that is not a 1x4 pattern"):
        manager.run(MagnitudePass(sparsity=0.75, pattern="1x4"))
    manager = _manager()
    manager.run(MagnitudePass(sparsity=0.5, pattern="1x4"))
    manager.run(MagnitudePass(sparsity=0.75, pattern="1x4"))  # the same pattern grows fine


@pytest.mark.parametrize("images,message", [
    (torch.randn(4, 1, 32, 32), r"shape \(1, 32, 32\) \(C, H, W\); the model was traced for \(3, 32, 32\)"),
    (torch.randn(4, 3, 16, 16), r"shape \(3, 16, 16\)"),
])
def test_calibration_images_of_the_wrong_shape_are_a_clear_error(images, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _manager().run(SparsityPass(saliency="obs-fisher", sparsity=0.5, solver={"num_grads": 4},
                                    calibration=images))


def test_labels_that_do_not_match_the_images_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="has 4 images but labels of shape"):
        make_calibration([(IMAGES[:4], torch.zeros(2, dtype=torch.long))])


def test_the_layerwise_solver_restores_each_module_mode() -> None:
    manager = _manager()
    gm = manager.graph_module
    gm.train()
    gm.get_submodule("blocks.0").eval()
    manager.run(SparsityPass(saliency="obs-layerwise", sparsity=0.5, calibration=IMAGES))
    assert gm.training and not gm.get_submodule("blocks.0").training


def test_finetune_that_fails_hands_the_model_back_as_it_came() -> None:
    model = small_vit(depth=1, num_classes=4).eval()
    bad = DataLoader(TensorDataset(IMAGES[:4], torch.tensor([0, 1, 2, 99])), batch_size=4)  # 99: no class
    with pytest.raises((IndexError, RuntimeError)):
        # on the CPU: a device-side assert would poison the CUDA context for every later test
        finetune(model, bad, None, FinetuneConfig(max_steps=1, device="cpu"), progress=False)
    assert not model.training


def test_bench_methods_prune_n_of_m_per_layer_whatever_their_scope() -> None:
    sparsity_pass = METHODS["obs-fisher"].make_pass(None, "2:4", IMAGES, samples=8)
    assert sparsity_pass.config.scope == "layer" and sparsity_pass.config.sparsity == 0.5
