"""Unstructured magnitude masks, the shared fine-tune loop (also under torchrun/DDP), recipes and folding."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vitsparse.compiler import (
    PassError,
    PassManager,
    Recipe,
    RecipeError,
    find_vit_structure,
    fold_for_export,
    load_weights,
    replay,
    save_weights,
    trace,
)
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import (
    FinetuneConfig,
    MagnitudePass,
    MaskedConv2d,
    MaskedLinear,
    SparsityConfig,
    distillation_loss,
    finetune,
    install_mask,
    mask_digest,
    mask_sparsity,
    masked_modules,
)

from helpers import small_vit

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def digits_base() -> nn.Module:
    return build_model("digits-vit", pretrained=True, progress=False)


@pytest.fixture(scope="module")
def loaders():
    return digits_loaders(batch_size=64)


def _masked(model: nn.Module, **settings):
    manager = PassManager(trace(model), recipe=Recipe(base={"model": "digits-vit"}))
    return manager, manager.run(MagnitudePass(**settings))


def _target_names(gm) -> list[str]:
    structure = find_vit_structure(gm)
    return [name for b in structure.blocks for name in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]


def test_sparsity_zero_is_the_identity() -> None:
    model = small_vit(depth=2)
    _, gm = _masked(model, sparsity=0.0)
    assert torch.equal(gm(X), model(X))
    assert len(masked_modules(gm)) == 2 * 4
    assert set(mask_sparsity(gm).values()) == {0.0}


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_layer_scope_removes_round_s_n_per_layer_and_leaves_embedding_and_head(sparsity: float) -> None:
    model = small_vit(depth=2)
    manager, gm = _masked(model, sparsity=sparsity, scope="layer")
    layers = manager.recipe.passes[0].decisions["layers"]
    assert sorted(layers) == sorted(_target_names(gm))
    for name, module in masked_modules(gm).items():
        expected = round(sparsity * module.weight.numel())
        assert int((module.weight == 0).sum()) == expected == int((~module.weight_mask).sum())
        assert layers[name]["pruned"] == expected
        assert layers[name]["nonzero"] == module.weight.numel() - expected
    assert type(gm.get_submodule("patch_embed.proj")) is nn.Conv2d
    assert type(gm.get_submodule("head")) is nn.Linear
    assert torch.equal(gm.get_submodule("head").weight, model.head.weight)
    assert torch.equal(gm.get_submodule("patch_embed.proj").weight, model.patch_embed.proj.weight)


def test_global_scope_removes_round_s_n_overall_by_one_threshold() -> None:
    model = small_vit(depth=2)
    _, gm = _masked(model, sparsity=0.6, scope="global")
    modules = masked_modules(gm)
    total = sum(m.weight.numel() for m in modules.values())
    assert sum(int((m.weight == 0).sum()) for m in modules.values()) == round(0.6 * total)
    assert len({round(s, 3) for s in mask_sparsity(gm).values()}) > 1  # layers differ
    original = {name: model.get_submodule(name).weight.detach().abs() for name in modules}
    kept_min = min(float(original[n][m.weight_mask].min()) for n, m in modules.items())
    pruned_max = max(float(original[n][~m.weight_mask].max()) for n, m in modules.items())
    assert pruned_max <= kept_min


def test_patch_embedding_and_head_can_be_targeted() -> None:
    model = small_vit(depth=1)
    _, gm = _masked(model, sparsity=0.5, targets=["patch_embed", "head", "fc1"])
    assert isinstance(gm.get_submodule("patch_embed.proj"), MaskedConv2d)
    assert isinstance(gm.get_submodule("head"), MaskedLinear)
    assert type(gm.get_submodule("blocks.0.attn.qkv")) is nn.Linear
    assert gm(X).shape == (3, 1000)
    assert find_vit_structure(gm).patch_embed == "patch_embed.proj"


@pytest.mark.parametrize("settings,message", [
    (dict(sparsity=1.0), r"sparsity must lie in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must lie in \[0, 1\)"),
    (dict(sparsity="half"), "sparsity must be a number"),
    (dict(sparsity=float("nan")), "sparsity must be a number"),
    (dict(scope="block"), "unknown scope 'block'"),
    (dict(targets=["qkv", "norm1"]), r"unknown target layer kinds \['norm1'\]"),
    (dict(targets="qkv"), "list of layer kinds"),
    (dict(targets=[]), "targets is empty"),
    (dict(nonsense=1), "unexpected keyword"),
])
def test_bad_magnitude_settings_raise_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        MagnitudePass(**settings)


@pytest.mark.parametrize("settings,message", [
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(distill_alpha=1.5), r"distill_alpha must lie in \[0, 1\]"),
    (dict(amp_dtype="int8"), "amp_dtype must be one of"),
    (dict(max_steps=0, lr=-1.0), "lr must be > 0.*max_steps must be >= 1"),
])
def test_bad_finetune_settings_raise_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**settings)


def test_pass_takes_a_config_not_a_bare_number() -> None:
    with pytest.raises(ValueError, match="takes a SparsityConfig"):
        MagnitudePass(0.5)
    assert MagnitudePass(SparsityConfig(sparsity=0.5)).config.sparsity == 0.5


@pytest.mark.slow
def test_masks_stay_exactly_zero_through_finetuning(digits_base, loaders) -> None:
    _, gm = _masked(digits_base, sparsity=0.5)
    before = {n: m.weight.detach().clone() for n, m in masked_modules(gm).items()}
    result = finetune(gm, loaders.train, None, FinetuneConfig(max_steps=5, lr=1e-2), **QUIET)
    assert result.steps == 5 and result.val is None and result.model is gm
    for name, module in masked_modules(gm).items():
        assert module.weight[~module.weight_mask].count_nonzero() == 0
        assert not torch.equal(module.weight, before[name])  # the kept weights did train
        assert mask_sparsity(gm)[name] == 0.5


def test_finetune_works_on_a_plain_module_too() -> None:
    model = small_vit(depth=1, num_classes=4)
    install_mask(model, "blocks.0.mlp.fc1", torch.rand(model.blocks[0].mlp.fc1.weight.shape) > 0.5)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    result = finetune(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8),
                      FinetuneConfig(max_steps=2, lr=1e-2), **QUIET)
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.weight[~fc1.weight_mask].count_nonzero() == 0
    assert result.val.num_samples == 8


@pytest.mark.slow
def test_distillation_path_runs(digits_base, loaders) -> None:
    _, gm = _masked(digits_base, sparsity=0.75)
    config = FinetuneConfig(max_steps=3, lr=1e-3, distill_alpha=0.7, distill_temperature=3.0)
    result = finetune(gm, loaders.train, loaders.val, config, teacher=digits_base, **QUIET)
    assert torch.isfinite(torch.tensor(result.train_loss)) and result.val.top1 > 0.5
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, logits, labels, alpha=0.0, temperature=2.0), plain)
    assert torch.allclose(distillation_loss(logits, logits, labels, alpha=1.0, temperature=2.0),
                          torch.zeros(()), atol=1e-6)


@pytest.mark.slow
def test_recipe_replay_and_weights_reproduce_the_masked_model_bit_exactly(digits_base, loaders,
                                                                          tmp_path: Path) -> None:
    manager, gm = _masked(digits_base, sparsity=0.6, scope="global")
    finetune(gm, loaders.train, None, FinetuneConfig(max_steps=3, lr=1e-2), **QUIET)
    manager.recipe.save(tmp_path / "recipe.json")
    save_weights(gm, tmp_path / "weights.safetensors")
    recipe = Recipe.load(tmp_path / "recipe.json")
    # masks come from the recipe alone, even onto different base weights
    untrained = replay(build_model("digits-vit"), recipe)
    assert mask_digest(untrained) == mask_digest(gm)
    rebuilt = load_weights(replay(digits_base, recipe), tmp_path / "weights.safetensors")
    images = next(iter(loaders.test))[0]
    assert torch.equal(rebuilt(images), gm(images))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), gm.state_dict().values(),
                                                  strict=True))
    replayed = PassManager(trace(digits_base), recipe=Recipe())
    replayed.run(MagnitudePass.from_record(recipe.passes[0]))
    assert replayed.recipe.passes[0].decisions == recipe.passes[0].decisions


@pytest.mark.slow
def test_corrupt_mask_record_is_refused(digits_base) -> None:
    manager, _ = _masked(digits_base, sparsity=0.5)
    data = manager.recipe.to_dict()
    layer = next(iter(data["passes"][0]["decisions"]["layers"].values()))
    layer["mask"] = "!!not base64!!"
    with pytest.raises(RecipeError, match="is corrupt"):
        replay(digits_base, Recipe.from_dict(data))
    layer["mask"], layer["shape"] = "eJwDAAAAAAE=", [3, 3]  # zlib of nothing: wrong length
    with pytest.raises(RecipeError, match="needs 2"):
        replay(digits_base, Recipe.from_dict(data))


def test_replay_onto_another_architecture_names_the_layer() -> None:
    manager, _ = _masked(small_vit(depth=1), sparsity=0.5)
    wider = small_vit("deit_small_patch16_224", depth=1)
    with pytest.raises(PassError, match=r"mask for 'blocks.0.attn.qkv' has shape \(576, 192\)"):
        replay(wider, manager.recipe)


@pytest.mark.slow
def test_export_folding_gives_plain_layers_with_identical_outputs(digits_base, loaders) -> None:
    _, gm = _masked(digits_base, sparsity=0.5, targets=["qkv", "fc2", "patch_embed"])
    images = next(iter(loaders.test))[0]
    expected = gm(images)
    zeros = sum(int((p == 0).sum()) for p in gm.parameters())
    folded = fold_for_export(gm)  # the compiler swaps each masked layer for its export_module()
    assert not masked_modules(folded) and mask_sparsity(folded) == {}
    assert {type(m) for m in folded.modules()} & {MaskedLinear, MaskedConv2d} == set()
    assert not [k for k in folded.state_dict() if k.endswith("weight_mask")]
    assert torch.equal(folded(images), expected)
    assert sum(int((p == 0).sum()) for p in folded.parameters()) == zeros
    find_vit_structure(folded)


@pytest.mark.slow
def test_digits_vit_accuracy_at_half_sparsity(digits_base, loaders) -> None:
    dense = evaluate(digits_base, loaders.test).top1
    _, gm = _masked(digits_base, sparsity=0.5)
    one_shot = evaluate(gm, loaders.test).top1
    result = finetune(gm, loaders.train, loaders.val, FinetuneConfig(epochs=2, lr=1e-3, warmup_steps=5),
                      teacher=digits_base, **QUIET)
    tuned = evaluate(gm, loaders.test).top1
    print(f"digits-vit top-1: dense {dense:.4f}, magnitude 50% one-shot {one_shot:.4f}, after "
          f"{result.steps} fine-tune steps ({result.seconds:.1f} s) {tuned:.4f}")
    assert one_shot > 0.5 and tuned >= 0.8


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CI and dev machines have none; runs on a lent GPU machine")
def test_finetune_on_cuda_with_mixed_precision_keeps_masks(digits_base, loaders) -> None:
    _, gm = _masked(digits_base, sparsity=0.5)
    for dtype in ("bfloat16", "float16"):
        config = FinetuneConfig(max_steps=5, lr=1e-3, amp_dtype=dtype)
        result = finetune(gm, loaders.train, loaders.val, config, teacher=digits_base, **QUIET)
        assert result.device.startswith("cuda") and result.val.top1 > 0.8
        assert not next(gm.parameters()).is_cuda and not next(digits_base.parameters()).is_cuda  # handed back
        assert all(m.weight[~m.weight_mask].count_nonzero() == 0 for m in masked_modules(gm).values())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_finetune_under_torchrun_keeps_masks_identical_on_every_rank(digits_base, tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_finetune_check.py")
    # digits-vit is cached by the fixture before launching; the check is CPU/gloo even on a GPU machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["digest_before"] != ranks[1]["digest_before"]  # rank 1 scrambled its masks ...
    assert ranks[0]["digest_after"] == ranks[1]["digest_after"] == ranks[0]["digest_before"]  # ... DDP fixed
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    for report in ranks:
        assert report["masked_nonzero"] == 0 and report["zeros"] >= report["pruned"] > 0
    assert ranks[0]["val_top1"] is not None and ranks[1]["val_top1"] is None
