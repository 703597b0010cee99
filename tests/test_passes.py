"""Pass manager, recipe JSON, replay and the rewrite helpers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vitsparse.compiler import (
    IdentityPass,
    PassError,
    PassManager,
    PassRecord,
    Recipe,
    RecipeError,
    count_costs,
    find_vit_structure,
    insert_module_after,
    load_weights,
    replay,
    save_weights,
    set_reshape_dims,
    slice_coupled,
    slice_linear,
    trace,
)
from vitsparse.compiler.graph_utils import node_by_name

from helpers import MlpHiddenSlice, small_vit, zero_mlp_channels

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_identity_pass_keeps_outputs_and_is_recorded() -> None:
    model = small_vit(depth=3)
    manager = PassManager(trace(model))
    gm = manager.run(IdentityPass())
    assert torch.equal(gm(X), model(X))
    (record,) = manager.recipe.passes
    assert record.name == "identity"
    assert record.stats["before"] == record.stats["after"]
    assert manager.recipe.input_shape == (3, 32, 32)


def test_removing_zero_channels_keeps_outputs_and_shrinks_costs() -> None:
    model = small_vit(depth=3)
    removed = list(range(0, 768, 3))
    for block in range(3):
        zero_mlp_channels(model, block, removed)
    kept = [c for c in range(768) if c not in removed]
    manager = PassManager(trace(model))
    gm = manager.run(MlpHiddenSlice({0: kept, 2: kept}))
    assert torch.allclose(gm(X), model(X), atol=1e-5)
    assert manager.structure.blocks[0].mlp.hidden_dim == len(kept)
    assert manager.structure.blocks[1].mlp.hidden_dim == 768
    stats = manager.recipe.passes[0].stats
    assert stats["after"]["macs"] < stats["before"]["macs"]
    assert stats["before"]["params"] - stats["after"]["params"] == 2 * len(removed) * (2 * 192 + 1)


def _pruned(tmp_path):
    model = small_vit(depth=2, seed=3)
    manager = PassManager(trace(model), recipe=Recipe(base={"model": "deit_tiny_patch16_224",
                                                           "kwargs": {"img_size": 32, "depth": 2}},
                                                     input_shape=(3, 32, 32)))
    manager.run(MlpHiddenSlice({0: list(range(0, 768, 2)), 1: list(range(100))}))
    gm = manager.graph_module
    with torch.no_grad():  # training after pruning changes weights; replay must carry them
        for p in gm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    manager.recipe.save(tmp_path / "recipe.json")
    save_weights(gm, tmp_path / "weights.safetensors")
    return gm


def test_recipe_json_round_trip(tmp_path) -> None:
    _pruned(tmp_path)
    recipe = Recipe.load(tmp_path / "recipe.json")
    assert Recipe.from_json(recipe.to_json()).to_dict() == recipe.to_dict()
    assert recipe.to_dict()["schema"] == 1
    assert [p.name for p in recipe.passes] == ["test-mlp-hidden-slice"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_replay_then_load_reproduces_the_pruned_model(tmp_path) -> None:
    pruned = _pruned(tmp_path)
    fresh_base = small_vit(depth=2, seed=99)  # different random weights: everything must come from disk
    recipe = Recipe.load(tmp_path / "recipe.json")
    rebuilt = load_weights(replay(fresh_base, recipe), tmp_path / "weights.safetensors")
    assert torch.equal(rebuilt(X), pruned(X))
    assert find_vit_structure(rebuilt).blocks[1].mlp.hidden_dim == 100


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"schema": 99, "passes": []}), "schema 99 is not supported"),
    (json.dumps({"schema": 1, "passes": [{"name": "no-such-pass"}]}), None),
    (json.dumps({"schema": 1, "passes": [{"params": {}}]}), "string 'name'"),
    (json.dumps({"schema": 1, "passes": "identity"}), "'passes' a list"),
])
def test_corrupt_recipe_gives_clear_error(text: str, message: str | None) -> None:
    if message is None:  # parses, but replay cannot know the pass
        with pytest.raises(RecipeError, match="unknown pass 'no-such-pass'"):
            replay(small_vit(depth=1), Recipe.from_json(text))
    else:
        with pytest.raises(RecipeError, match=message):
            Recipe.from_json(text)


def test_weights_that_do_not_fit_the_recipe_are_refused(tmp_path) -> None:
    _pruned(tmp_path)
    unpruned = trace(small_vit(depth=2))
    with pytest.raises(RecipeError, match="do not fit the replayed graph.*blocks.0.mlp.fc1.weight"):
        load_weights(unpruned, tmp_path / "weights.safetensors")
    with pytest.raises(RecipeError, match="does not exist"):
        load_weights(unpruned, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(RecipeError, match="cannot read weights"):
        load_weights(unpruned, tmp_path / "bad.safetensors")


def test_trace_copies_weights_so_the_model_is_never_changed() -> None:
    model = small_vit(depth=1)
    reference = model(X)
    gm = trace(model)
    with torch.no_grad():
        for p in gm.parameters():
            p.zero_()
    assert torch.equal(model(X), reference)
    shared = trace(model, copy_weights=False)
    assert shared.get_submodule("blocks.0.attn.qkv") is model.blocks[0].attn.qkv


def test_slice_linear_keeps_selected_rows_and_columns() -> None:
    gm = trace(small_vit(depth=1))
    old = gm.get_submodule("blocks.0.mlp.fc1")
    weight, bias = old.weight.detach().clone(), old.bias.detach().clone()
    new = slice_linear(gm, "blocks.0.mlp.fc1", out_keep=[5, 1], in_keep=[0, 2, 4])
    assert gm.get_submodule("blocks.0.mlp.fc1") is new
    assert torch.equal(new.weight, weight[[5, 1]][:, [0, 2, 4]]) and torch.equal(new.bias, bias[[5, 1]])
    with pytest.raises(PassError, match="indices must lie in"):
        slice_linear(gm, "blocks.0.mlp.fc2", in_keep=[10_000])
    with pytest.raises(PassError, match="refusing to remove every channel"):
        slice_linear(gm, "blocks.0.mlp.fc2", in_keep=[])
    with pytest.raises(PassError, match="not a Linear"):
        slice_linear(gm, "blocks.0.norm1", in_keep=[0])


def test_slice_coupled_shrinks_the_whole_residual_stream() -> None:
    model = small_vit("deit3_small_patch16_224", depth=2)  # layer scale: gammas are coupled too
    gm = trace(model)
    structure = find_vit_structure(gm)
    before = count_costs(gm)
    slice_coupled(gm, structure.residual_coupled, keep=list(range(0, 384, 2)))
    gm.recompile()
    after = find_vit_structure(gm)
    assert after.embed_dim == 192
    assert gm(X).shape == (3, 1000)
    assert count_costs(gm).macs < before.macs


def test_set_reshape_dims_and_insert_module_after() -> None:
    model = small_vit(depth=1)
    gm = trace(model)
    attn = find_vit_structure(gm).blocks[0].attn
    node = set_reshape_dims(gm, attn.qkv_reshape_node, {3: attn.num_heads, 4: attn.head_dim})
    assert node.args[4:] == (attn.num_heads, attn.head_dim)
    with pytest.raises(PassError, match="computed at run time"):
        set_reshape_dims(gm, attn.qkv_reshape_node, {0: 5})
    with pytest.raises(PassError, match="not a reshape"):
        set_reshape_dims(gm, attn.core_node, {0: 5})

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    fc1 = node_by_name(gm, "blocks_0_mlp_fc1")
    insert_module_after(gm, fc1, "blocks.0.mlp.scale", Scale())
    gm.graph.lint()
    gm.recompile()
    assert [u.target for u in fc1.users] == ["blocks.0.mlp.scale"]
    assert not torch.allclose(gm(X), model(X))
    with pytest.raises(PassError, match="already exists"):
        insert_module_after(gm, fc1, "blocks.0.mlp.scale", Scale())


def test_pass_record_rejects_unknown_fields() -> None:
    with pytest.raises(RecipeError, match="unknown fields"):
        PassRecord.from_dict({"name": "identity", "surprise": 1})
