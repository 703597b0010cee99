"""VTP dimension slicing: gates, global threshold, head-equal rounding, folding, replay, export, errors."""

from __future__ import annotations

import copy
import json
import warnings

import onnx
import pytest
import torch

from vitsparse.compiler import (
    ExportConfig,
    PassError,
    PassManager,
    Recipe,
    RecipeError,
    SelectFeatures,
    export_artifact,
    find_vit_structure,
    load_weights,
    replay,
    save_weights,
    trace,
)
from vitsparse.models import build_model, digits_loaders
from vitsparse.pruners import (
    SITE_NAMES,
    DimensionSlicePass,
    FinetuneConfig,
    ScoreGatePass,
    SparsityPass,
    score_l1,
    sparse_train,
)
from vitsparse.pruners.mask_codec import decode_mask
from vitsparse.pruners.vtp import (
    KeepCount,
    engine_safe_count,
    keep_step,
    round_keep,
    score_gates,
)
from vitsparse.pruners.vtp_sites import deepsparse_rejects_hidden
from vitsparse.runtime import ENGINES, create_engine, engine_status
from vitsparse.runtime.errors import EngineLoadError

from helpers import STRUCTURE_IDS, STRUCTURE_VARIANTS, small_vit

AVAILABLE = [name for name in ENGINES if engine_status(name).available]
VARIANTS = STRUCTURE_VARIANTS


def _gated(model: torch.nn.Module, sites=SITE_NAMES, seed: int = 0) -> PassManager:
    """The model traced and gated, every score drawn from [-0.5, 2) (some negative, some near 0)."""
    manager = PassManager(trace(model), recipe=Recipe(base={"model": "test"}))
    manager.run(ScoreGatePass(sites))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in score_gates(manager.graph_module).values():
            gate.score.copy_(torch.rand(gate.score.shape, generator=generator) * 2.5 - 0.5)
    return manager


def _zero_removed_scores(gated: torch.nn.Module, record) -> None:
    """In a copy of the gated model: scores of the dimensions the slice removed set to 0."""
    for key, site in record.decisions["sites"].items():
        block, name = key.split(".")
        gate = gated.get_submodule(f"vtp_gate_{block}_{name}")
        with torch.no_grad():
            gate.score.mul_(decode_mask(site["mask"], [site["size"]], key).to(gate.score))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_rate_zero_with_unit_scores_is_the_identity(fused: bool) -> None:
    model = small_vit(depth=2, fused=fused)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    manager = PassManager(trace(model))
    manager.run(ScoreGatePass())
    manager.run(DimensionSlicePass(0.0))
    assert torch.equal(manager.graph_module(x), expected)
    assert manager.recipe.passes[-1].stats["removed_fraction"] == 0.0
    assert manager.costs.macs == manager.recipe.passes[0].stats["before"]["macs"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=STRUCTURE_IDS)
def test_slicing_after_folding_reproduces_the_gated_model(name: str, kwargs: dict, fused: bool) -> None:
    model = small_vit(name, depth=2, fused=fused, **kwargs)
    manager = _gated(model)
    reference = copy.deepcopy(manager.graph_module)
    manager.run(DimensionSlicePass(0.4))
    record = manager.recipe.passes[-1]
    _zero_removed_scores(reference, record)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = reference(x), manager.graph_module(x)
    for e, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (expected, got)), strict=True):
        assert (e - g).abs().max() < 1e-5
    assert not score_gates(manager.graph_module)
    assert record.stats["after"]["macs"] < record.stats["before"]["macs"]
    assert 0.3 < record.stats["removed_fraction"] < 0.5
    for block in find_vit_structure(manager.graph_module).blocks:
        heads, v_dim = block.attn.num_heads, block.attn.v_head_dim
        assert v_dim < block.attn.head_dim and (heads * v_dim) % 8 == 0  # equal per head, total in 8s
        assert block.mlp.hidden_dim % 8 == 0


def test_replayed_recipe_with_weights_is_bit_exact(tmp_path) -> None:
    model = small_vit(depth=2)
    manager = _gated(model)
    manager.run(DimensionSlicePass(0.4))
    recipe = Recipe.from_json(manager.recipe.to_json())
    save_weights(manager.graph_module, tmp_path / "w.safetensors")
    rebuilt = load_weights(replay(small_vit(depth=2, seed=5), recipe), tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), manager.graph_module(x))


def test_global_threshold_follows_the_scores() -> None:
    """A site whose scores are all low loses more than one whose scores are all high."""
    manager = _gated(small_vit(depth=2))
    with torch.no_grad():
        gm = manager.graph_module
        gm.get_submodule("vtp_gate_0_mlp_hidden").score.mul_(0.01)
        gm.get_submodule("vtp_gate_1_mlp_hidden").score.add_(10.0)
    with pytest.warns(UserWarning, match=r"sites \['0.mlp_hidden'\]"):
        manager.run(DimensionSlicePass(0.3))
    sites = manager.recipe.passes[-1].decisions["sites"]
    assert sites["0.mlp_hidden"]["kept"] < sites["1.mlp_hidden"]["kept"] == sites["1.mlp_hidden"]["size"]


@pytest.mark.parametrize("count,size,groups,multiple,expected", [
    (230, 384, 1, 8, KeepCount(232, False)),   # nearest multiple of 8
    (227, 384, 1, 8, KeepCount(224, False)),
    (384, 384, 1, 8, KeepCount(384, False)),   # a site kept whole stays whole
    (3, 384, 1, 8, KeepCount(8, True)),        # the rate would empty the site: one step kept, said
    (0, 384, 6, 8, KeepCount(4, True)),        # 6 heads, total in 8s: steps of 4 per head
    (150, 384, 6, 8, KeepCount(24, False)),    # 25 per head rounds to 24
    (100, 100, 1, 8, KeepCount(100, False)),
    (230, 384, 1, 1, KeepCount(230, False)),
])
def test_keep_counts_round_to_the_multiple(count, size, groups, multiple, expected) -> None:
    assert round_keep(count, size, groups, multiple) == expected


def test_keep_step_makes_head_totals_a_multiple() -> None:
    assert keep_step(8, 6, 64) == 4 and keep_step(8, 3, 64) == 8 and keep_step(8, 4, 16) == 2
    assert keep_step(8, 1, 5) == 5  # capped at the group size


def test_engine_safe_count_moves_off_widths_deepsparse_rejects() -> None:
    assert [w for w in (768, 769, 776, 784, 785, 904, 912, 920) if deepsparse_rejects_hidden(w)] == [
        769, 776, 784, 904, 912]
    assert engine_safe_count(904, 1, 1536, 8, deepsparse_rejects_hidden) == 896  # nearer than 920
    assert engine_safe_count(912, 1, 1536, 8, deepsparse_rejects_hidden) == 920  # nearer than 896
    assert engine_safe_count(920, 1, 1536, 8, deepsparse_rejects_hidden) == 920


def test_a_rate_that_would_empty_a_site_keeps_one_step_and_says_so() -> None:
    manager = _gated(small_vit(depth=2))
    with torch.no_grad():
        manager.graph_module.get_submodule("vtp_gate_1_qkv_in").score.fill_(1e-6)
    with pytest.warns(UserWarning, match=r"would remove every dimension of sites \['1.qkv_in'\]"):
        manager.run(DimensionSlicePass(0.15))
    record = manager.recipe.passes[-1]
    assert record.stats["floored_sites"] == ["1.qkv_in"]
    assert record.decisions["sites"]["1.qkv_in"]["kept"] == 8


def test_attention_output_keeps_at_least_one_step_per_head() -> None:
    manager = _gated(small_vit(depth=1), sites=("attn_out",))
    with torch.no_grad():
        manager.graph_module.get_submodule("vtp_gate_0_attn_out").score.fill_(1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.run(DimensionSlicePass(0.99))
    attn = find_vit_structure(manager.graph_module).blocks[0].attn
    assert (attn.num_heads, attn.v_head_dim) == (3, 8)  # 3 heads: steps of 8 per head keep 24 in total


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.4"])
def test_bad_rates_are_clear_errors(rate) -> None:
    with pytest.raises(ValueError, match=r"pruning rate must lie in \[0, 1\)"):
        DimensionSlicePass(rate)


def test_bad_sites_and_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown sites \\['qkv_out'\\]; choose from qkv_in, attn_out"):
        ScoreGatePass(("qkv_out",))
    with pytest.raises(ValueError, match="distinct and non-empty"):
        ScoreGatePass(())
    with pytest.raises(ValueError, match="multiple must be an integer >= 1"):
        DimensionSlicePass(0.4, multiple=0)
    manager = PassManager(trace(small_vit(depth=1)))
    with pytest.raises(PassError, match="no VTP score gates in the graph: run ScoreGatePass"):
        manager.run(DimensionSlicePass(0.4))
    with pytest.raises(PassError, match="no VTP score gates; run ScoreGatePass first"):
        score_l1(manager.graph_module)
    manager.run(ScoreGatePass(("mlp_in",)))
    with pytest.raises(PassError, match="block 0 already has a score gate at mlp_in"):
        manager.run(ScoreGatePass(("mlp_in",)))


def test_a_norm_inside_a_site_is_refused() -> None:
    model = small_vit("vit_small_patch16_224", depth=1, scale_attn_norm=True, scale_mlp_norm=True)
    manager = PassManager(trace(model))
    with pytest.raises(PassError, match="attn_out in block 0: a norm .* normalises the attention output"):
        manager.run(ScoreGatePass())
    assert not score_gates(manager.graph_module)  # refused before any gate went in
    manager.run(ScoreGatePass(("qkv_in", "mlp_in")))  # the other sites still work


def test_corrupt_slice_record_is_a_recipe_error() -> None:
    manager = _gated(small_vit(depth=1))
    manager.run(DimensionSlicePass(0.4))
    recipe = Recipe.from_json(manager.recipe.to_json())
    del recipe.passes[-1].decisions["sites"]["0.qkv_in"]
    with pytest.raises(RecipeError, match="does not match the gated sites: \\['0.qkv_in'\\]"):
        replay(small_vit(depth=1), recipe)


def test_sparse_training_adds_the_l1_penalty() -> None:
    """With a large λ the scores shrink; the penalty is what moves them."""
    loaders = digits_loaders()
    config = FinetuneConfig(epochs=1, lr=1e-2, max_steps=5, warmup_steps=0)
    norms = {}
    for l1 in (0.0, 1.0):
        manager = PassManager(trace(build_model("digits-vit")))
        gated = manager.run(ScoreGatePass())
        sparse_train(gated, loaders.train, config, l1=l1, progress=False)
        norms[l1] = float(score_l1(gated).detach())
    sizes = sum(g.score.numel() for g in score_gates(gated).values())
    assert norms[1.0] < 0.97 * sizes and norms[1.0] < norms[0.0]


@pytest.mark.slow
def test_sliced_and_masked_model_exports_and_runs_on_every_engine(tmp_path) -> None:
    """Slice (widths in 16s), then mask: both export forms match torch; DeepSparse runs the one-hot form
    whole."""
    manager = _gated(small_vit(depth=2))
    manager.run(DimensionSlicePass(0.4, multiple=16))
    manager.run(SparsityPass(sparsity=0.5))
    gm = manager.graph_module
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = gm(x).numpy()
    gathers, transposes = {}, {}
    for form in ("gather", "matmul", "gather-last"):
        result = export_artifact(gm, manager.recipe, tmp_path / form, ExportConfig(feature_select=form))
        nodes = onnx.load(str(result.directory / "model.onnx")).graph.node
        gathers[form] = sum(n.op_type == "Gather" for n in nodes)  # shape lookups are Gathers too
        transposes[form] = sum(n.op_type == "Transpose" for n in nodes)
        assert result.meta["feature_select"] == form
        for name in AVAILABLE:
            if name == "deepsparse" and form != "matmul":
                continue  # DeepSparse has no Gather: the bench gives it the one-hot form
            engine = create_engine(name, result.directory / "model.onnx", batch_size=1, num_cores=1)
            (got,) = engine.run([x.numpy()])
            assert abs(got - expected).max() < 1e-4
            if name == "deepsparse":
                assert engine.fraction_of_supported_ops == 1.0
    selections = sum(isinstance(m, SelectFeatures) for m in gm.modules())
    assert selections == 4 and gathers["gather"] - gathers["matmul"] == selections
    assert gathers["gather-last"] == gathers["gather"]  # the same gathers, without the transposes around them
    assert transposes["gather"] - transposes["gather-last"] == 2 * selections


@pytest.mark.skipif("deepsparse" not in AVAILABLE, reason=engine_status("deepsparse").reason)
def test_deepsparse_refuses_sparse_weights_at_widths_it_gets_wrong(tmp_path) -> None:
    """Masking after slicing in 8s leaves sparse weights with e.g. 120 inputs, which DeepSparse 1.8
    multiplies wrongly: the engine refuses them instead of returning wrong numbers."""
    manager = _gated(small_vit(depth=1))
    manager.run(DimensionSlicePass(0.4, multiple=8))
    manager.run(SparsityPass(sparsity=0.5))
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "a",
                             ExportConfig(feature_select="matmul"))
    with pytest.raises(EngineLoadError, match=r"wrong results for sparse weights whose input width is not a "
                                              r"multiple of 16; .* The widths come from "
                                              r"DimensionSlicePass\(multiple=8\) in recipe.json"):
        create_engine("deepsparse", result.directory / "model.onnx", batch_size=1, num_cores=1)


def test_the_width_advice_names_the_pass_that_sliced_and_its_multiple(tmp_path) -> None:
    from vitsparse.runtime.deepsparse_engine import slicing_advice

    recipe = {"passes": [{"name": "head-channel-slice", "params": {"budget": 0.3, "multiple": 8}},
                         {"name": "magnitude", "params": {"sparsity": 0.9}}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert slicing_advice(tmp_path / "recipe.json").startswith(
        "The widths come from HeadChannelSlicePass(multiple=8) in recipe.json: run it with multiple=16")
    assert "DimensionSlicePass or HeadChannelSlicePass" in slicing_advice(tmp_path / "missing.json")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CI and dev machines have none; runs on a lent GPU machine")
def test_sparse_training_runs_on_cuda() -> None:
    loaders = digits_loaders()
    manager = PassManager(trace(build_model("digits-vit")))
    gated = manager.run(ScoreGatePass())
    result = sparse_train(gated, loaders.train, FinetuneConfig(max_steps=3), l1=1e-4, progress=False)
    assert result.device.startswith("cuda") and next(gated.parameters()).device.type == "cpu"
    reference = copy.deepcopy(gated.cuda())  # slicing a model that lives on the GPU
    manager.run(DimensionSlicePass(0.4))
    _zero_removed_scores(reference, manager.recipe.passes[-1])
    x = next(iter(loaders.test))[0].cuda()
    with torch.no_grad():
        assert (manager.graph_module(x) - reference(x)).abs().max() < 1e-4
