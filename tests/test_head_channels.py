"""Head-equal channel removal: gates, budgeted selection, folding, slicing, signals, search, replay,
errors, composition."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vitsparse.compiler import (
    ExportConfig,
    NotAViTError,
    PassError,
    PassManager,
    Recipe,
    RecipeError,
    attention_macs,
    export_artifact,
    find_vit_structure,
    load_weights,
    replay,
    save_weights,
    trace,
)
from vitsparse.models import build_model, digits_loaders
from vitsparse.pruners import (
    DimensionSlicePass,
    FinetuneConfig,
    HeadChannelSlicePass,
    HeadGatePass,
    ScoreGatePass,
    SparsityPass,
    indicators_from_weights,
    search_head_channels,
)
from vitsparse.pruners.head_channels import ramp_share
from vitsparse.pruners.head_gates import all_gates
from vitsparse.pruners.head_select import choose_head_channels, set_keep_masks
from vitsparse.pruners.head_signals import measure_signals
from vitsparse.pruners.mask_codec import record_masks
from vitsparse.pruners.vtp import scores_from_weight_norms
from vitsparse.runtime import ENGINES, create_engine, engine_status

from helpers import STRUCTURE_IDS, STRUCTURE_VARIANTS, small_vit

AVAILABLE = [name for name in ENGINES if engine_status(name).available]
VARIANTS = STRUCTURE_VARIANTS
IDS = STRUCTURE_IDS


def _gated(model: nn.Module, seed: int = 0, mode: str = "mask") -> PassManager:
    """Traced and gated; indicators drawn from N(0, 1), reweight scales from [0.5, 1.5)."""
    manager = PassManager(trace(model), recipe=Recipe(base={"model": "test"}))
    manager.run(HeadGatePass(mode))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in all_gates(manager.graph_module, manager.structure).values():
            gate.set_indicator(torch.randn(gate.groups, gate.width, generator=generator))
            gate.reweight.copy_(torch.rand(gate.reweight.shape, generator=generator) + 0.5)
    return manager


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return max(float((e - g).abs().max()) for e, g in zip(_outputs(a, x), _outputs(b, x), strict=True))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_gates_and_a_zero_budget_change_nothing(fused: bool) -> None:
    model = small_vit(depth=2, fused=fused)
    x = torch.randn(3, 3, 32, 32)
    expected = _outputs(model, x)[0]
    manager = PassManager(trace(model))
    manager.run(HeadGatePass())
    assert torch.equal(manager.graph_module(x), expected)
    manager.run(HeadChannelSlicePass(0.0))
    assert torch.equal(manager.graph_module(x), expected)
    assert manager.costs.macs == manager.recipe.passes[0].stats["before"]["macs"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=IDS)
def test_slicing_reproduces_the_gated_model_with_equal_heads(name: str, kwargs: dict, fused: bool) -> None:
    """The sliced graph computes what the gated one computes with its keep masks at the selection (the
    reweight scales folded in), keeps every head the same width and removes the budget's MACs."""
    model = small_vit(name, depth=2, fused=fused, **kwargs)
    manager = _gated(model)
    gm = manager.graph_module
    kept, removed = choose_head_channels(gm, manager.structure, 0.4, 8)
    set_keep_masks(gm, kept, manager.structure)
    reference, before = copy.deepcopy(gm), attention_macs(gm)
    manager.run(HeadChannelSlicePass(0.4))
    sliced = manager.graph_module
    x = torch.randn(2, 3, 32, 32)
    qk_norm = kwargs.get("qk_norm", False)
    if not qk_norm:  # a q/k norm's statistics change with its width: only shapes are exact there
        assert _max_diff(reference, sliced, x) < 1e-5
    assert 1 - attention_macs(sliced) / before == pytest.approx(removed)
    assert 0.4 <= removed < 0.45
    original = find_vit_structure(trace(model)).blocks[0].attn
    for block in find_vit_structure(sliced).blocks:
        attn, heads = block.attn, block.attn.num_heads
        assert heads == original.num_heads
        assert sliced.get_submodule(attn.qkv).out_features == heads * (2 * attn.head_dim + attn.v_head_dim)
        assert (heads * attn.head_dim) % 8 == 0 and (heads * attn.v_head_dim) % 8 == 0
        assert attn.scale == original.scale  # the original attention scale, whatever the new width
        if qk_norm:  # the shared norm keeps the selected channels, the reweight scales folded into it
            channels = kept[f"{block.index}.qk"][0]
            assert channels.numel() < original.head_dim
            gate = reference.get_submodule(f"head_gate_{block.index}_qk")
            norm = reference.get_submodule(attn.q_norm)
            expected_weight = (norm.weight * gate.reweight)[channels]
            assert torch.allclose(sliced.get_submodule(attn.q_norm).weight, expected_weight)
            assert torch.equal(sliced.get_submodule(attn.k_norm).weight,
                               reference.get_submodule(attn.k_norm).weight[channels])
            rows = (torch.arange(heads).unsqueeze(1) * original.head_dim + channels).flatten()
            assert torch.equal(sliced.get_submodule(attn.qkv).weight[:rows.numel()],
                               reference.get_submodule(attn.qkv).weight[rows])
    assert all(torch.isfinite(t).all() for t in _outputs(sliced, x))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_slicing_a_sliced_model_again_reproduces_the_gated_model(fused: bool) -> None:
    """After VTP (v already narrower than q/k, qkv's v split out) and after a first head-channel slice,
    another round still computes what its gated model computes."""
    manager = PassManager(trace(small_vit(depth=2, fused=fused)))
    manager.run(ScoreGatePass())
    scores_from_weight_norms(manager.graph_module)
    manager.run(DimensionSlicePass(0.3, multiple=16))
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        gm = manager.run(HeadGatePass())
        indicators_from_weights(gm)
        kept, _ = choose_head_channels(gm, manager.structure, 0.3, 8)
        set_keep_masks(gm, kept, manager.structure)
        reference = copy.deepcopy(gm)
        manager.run(HeadChannelSlicePass(0.3))
        assert _max_diff(reference, manager.graph_module, x) < 1e-5
    widths = [(b.attn.head_dim, b.attn.v_head_dim) for b in manager.structure.blocks]
    assert all(qk < 64 and v < 64 for qk, v in widths)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("name,kwargs", [v for v in VARIANTS if "qk_norm" not in v[1]],
                         ids=[i for i, v in zip(IDS, VARIANTS, strict=True) if "qk_norm" not in v[1]])
def test_removing_channels_whose_weights_are_zero_leaves_outputs_unchanged(name, kwargs, fused) -> None:
    model = small_vit(name, depth=2, fused=fused, **kwargs)
    heads, width = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    zero_qk, zero_v = [1, 5, 6, 30], [0, 2, 3, 4, 9, 17, 40, 63]
    with torch.no_grad():
        for block in model.blocks:
            rows = torch.arange(heads).unsqueeze(1) * width
            for offset, channels in ((0, zero_qk), (heads * width, zero_qk), (2 * heads * width, zero_v)):
                index = (offset + rows + torch.tensor(channels)).flatten()
                block.attn.qkv.weight[index] = 0
                block.attn.qkv.bias[index] = 0
    x = torch.randn(2, 3, 32, 32)
    manager = PassManager(trace(model))
    manager.run(HeadGatePass())

    def complement(channels: list[int]) -> torch.Tensor:
        keep = [c for c in range(width) if c not in channels]
        return torch.tensor(keep).expand(heads, -1)

    kept = {f"{b}.{kind}": complement(zero_qk if kind == "qk" else zero_v)
            for b in range(2) for kind in ("qk", "v")}
    manager.run(HeadChannelSlicePass(0.3, kept=kept))
    assert _max_diff(model, manager.graph_module, x) < 1e-5
    attn = find_vit_structure(manager.graph_module).blocks[1].attn
    assert (attn.head_dim, attn.v_head_dim) == (width - len(zero_qk), width - len(zero_v))


def test_selection_spends_the_budget_where_channels_matter_least() -> None:
    manager = _gated(small_vit(depth=2))
    gm = manager.graph_module
    gates = all_gates(gm, manager.structure)
    with torch.no_grad():
        gates["0.v"].set_indicator(torch.full((3, 64), -4.0))  # block 0's v is worthless
        gates["1.v"].set_indicator(torch.full((3, 64), 8.0))
    kept, removed = choose_head_channels(gm, manager.structure, 0.25, 8)
    assert kept["0.v"].shape[1] < 64 and kept["1.v"].shape[1] == 64
    assert all(k.shape[0] == 3 and k.shape[1] % 8 == 0 for k in kept.values())  # 3 heads: steps of 8
    assert 0.25 <= removed < 0.3


def test_replayed_recipe_with_weights_is_bit_exact(tmp_path) -> None:
    manager = _gated(small_vit(depth=2))
    manager.run(HeadChannelSlicePass(0.4))
    recipe = Recipe.from_json(manager.recipe.to_json())
    save_weights(manager.graph_module, tmp_path / "w.safetensors")
    rebuilt = load_weights(replay(small_vit(depth=2, seed=5), recipe), tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), manager.graph_module(x))


@pytest.mark.parametrize("name,kwargs", [VARIANTS[0], VARIANTS[2]], ids=[IDS[0], IDS[2]])
def test_signals_agree_between_fused_and_explicit_attention(name: str, kwargs: dict) -> None:
    """The attention difference and similarity read the same numbers whether attention is fused (the
    scores recomputed from q and k) or spelled out (read from the graph), streamed in one batch or two;
    a q–k channel whose q weights are zero changes nothing."""
    signals = {}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for fused, batches in ((True, [images]), (False, images.split(2))):
        model = small_vit(name, depth=1, fused=fused, **kwargs)
        if "qk_norm" not in kwargs:
            with torch.no_grad():
                model.blocks[0].attn.qkv.weight[[3, 64 + 3, 128 + 3]] = 0  # channel 3 of q in every head
                model.blocks[0].attn.qkv.bias[[3, 64 + 3, 128 + 3]] = 0
        manager = PassManager(trace(model))
        gm = manager.run(HeadGatePass())
        measured = measure_signals(gm, manager.structure, batches)
        signals[fused] = {**measured.difference, **{f"sim-{k}": v for k, v in measured.similarity.items()}}
    for key, value in signals[True].items():
        assert torch.allclose(value, signals[False][key], atol=1e-5, rtol=1e-4), key
    assert signals[True]["sim-0.v"].mean(dim=1).allclose(torch.tensor(1.0))
    if "qk_norm" not in kwargs:
        assert float(signals[True]["0.qk"][:, 3].abs().max()) < 1e-7
        assert float(signals[True]["0.qk"].max()) > 0
    else:
        assert signals[True]["0.qk"].shape == (1, 64)  # one set of q/k channels shared by every head


def test_search_follows_the_budget_and_trains_the_indicators() -> None:
    loaders = digits_loaders()
    dense = build_model("digits-vit")
    manager = PassManager(trace(dense))
    gm = manager.run(HeadGatePass())
    config = FinetuneConfig(epochs=1, lr=1e-3, max_steps=6, warmup_steps=0)
    before = {k: g.raw_indicator.detach().clone() for k, g in all_gates(gm, manager.structure).items()}
    search_head_channels(gm, loaders.train, config, 0.3, calibration=loaders.train, teacher=dense,
                         progress=False)
    gates = all_gates(gm, manager.structure)
    assert any(not torch.equal(before[k], g.raw_indicator) for k, g in gates.items())
    assert any(float(g.similarity.std()) > 0 for g in gates.values())
    assert any(not torch.equal(g.reweight, torch.ones_like(g.reweight)) for g in gates.values())
    kept_after_search = {k: g.keep.bool() for k, g in gates.items()}
    reference = copy.deepcopy(gm)
    manager.run(HeadChannelSlicePass(0.3))
    record = manager.recipe.passes[-1]
    assert 0.3 <= record.stats["attention_removed_fraction"] < 0.35
    masks = record_masks(record, "gates", "shape")
    for key, keep in kept_after_search.items():  # the search ended on the selection the slice keeps
        assert torch.equal(keep.cpu(), masks[key])
    x = next(iter(loaders.test))[0]
    assert _max_diff(reference, manager.graph_module, x) < 1e-4


def test_l1_ablation_trains_scales_with_the_penalty() -> None:
    loaders = digits_loaders()
    config = FinetuneConfig(epochs=1, lr=1e-2, max_steps=5, warmup_steps=0)
    norms = {}
    for l1 in (0.0, 1.0):
        manager = PassManager(trace(build_model("digits-vit")))
        gm = manager.run(HeadGatePass("scale"))
        search_head_channels(gm, loaders.train, config, 0.3, variant="l1", l1=l1, progress=False)
        gates = all_gates(gm, manager.structure).values()
        norms[l1] = sum(float(g.indicator.detach().abs().sum()) for g in gates)
    assert norms[1.0] < norms[0.0]
    with pytest.raises(PassError, match="variant 'full' trains gates in 'mask' mode"):
        search_head_channels(gm, loaders.train, config, 0.3, variant="full", progress=False)


def test_the_budget_ramps_in_after_a_warm_up_at_full_width() -> None:
    shares = [ramp_share(step, 8, (0.25, 0.75)) for step in range(8)]
    assert shares == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1, 1, 1])
    assert ramp_share(0, 1, (0.0, 1.0)) == 1.0  # a one-step search ends on the budget
    gm = _gated(small_vit(depth=1)).graph_module
    for ramp, message in (((0.75, 0.25), "0 <= start < end <= 1"), ((0.0, 1.5), "0 <= start < end <= 1"),
                          (0.5, r"ramp must be \(start, end\) fractions")):
        with pytest.raises(ValueError, match=message):
            search_head_channels(gm, [], FinetuneConfig(), 0.3, ramp=ramp)


@pytest.mark.parametrize("budget", [1.0, -0.1, "0.3", True])
def test_bad_budgets_are_clear_errors(budget) -> None:
    with pytest.raises(ValueError, match=r"budget must lie in \[0, 1\)"):
        HeadChannelSlicePass(budget)


def test_bad_input_is_a_clear_error() -> None:
    manager = _gated(small_vit(depth=1))
    with pytest.raises(PassError, match="budget of 97% fewer attention MACs would empty heads"):
        manager.run(HeadChannelSlicePass(0.97))
    with pytest.raises(PassError, match="block 0 already has head-channel gates"):
        manager.run(HeadGatePass())
    with pytest.raises(ValueError, match="unknown head-channel variant 'fast'; choose from full, l1"):
        search_head_channels(manager.graph_module, [], FinetuneConfig(), 0.3, variant="fast")
    with pytest.raises(ValueError, match="need calibration images"):
        search_head_channels(manager.graph_module, [], FinetuneConfig(), 0.3)
    with pytest.raises(ValueError, match="multiple must be an integer >= 1"):
        HeadChannelSlicePass(0.3, multiple=0)
    plain = PassManager(trace(small_vit(depth=1)))
    with pytest.raises(PassError, match="block 0 has no head-channel gates: run HeadGatePass first"):
        plain.run(HeadChannelSlicePass(0.3))
    normed = PassManager(trace(small_vit("vit_small_patch16_224", depth=1, scale_attn_norm=True)))
    with pytest.raises(PassError, match="block 0: a norm .* normalises the attention output"):
        normed.run(HeadGatePass())


def test_a_model_whose_heads_cannot_be_found_is_a_clear_error() -> None:
    mlp = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    mlp.default_cfg = {"input_size": (3, 32, 32)}
    with pytest.raises(NotAViTError, match="no self-attention found"):
        PassManager(trace(mlp, input_shape=(3, 32, 32)))


def test_corrupt_slice_record_is_a_recipe_error() -> None:
    manager = _gated(small_vit(depth=1))
    manager.run(HeadChannelSlicePass(0.3))
    recipe = Recipe.from_json(manager.recipe.to_json())
    del recipe.passes[-1].decisions["gates"]["0.v"]
    with pytest.raises(RecipeError, match=r"does not match the gated blocks: \['0.v'\]"):
        replay(small_vit(depth=1), recipe)


@pytest.mark.slow
def test_composes_with_dimension_slicing_and_masks_and_runs_on_every_engine(tmp_path) -> None:
    """VTP slicing, then head-equal channels, then 50 % masks (widths in 16s): the export matches torch on
    every engine and DeepSparse runs the whole graph."""
    manager = PassManager(trace(small_vit(depth=2)), recipe=Recipe(base={"model": "test"}))
    manager.run(ScoreGatePass())
    scores_from_weight_norms(manager.graph_module)
    manager.run(DimensionSlicePass(0.3, multiple=16))
    manager.run(HeadGatePass())
    indicators_from_weights(manager.graph_module)
    manager.run(HeadChannelSlicePass(0.3, multiple=16))
    manager.run(SparsityPass(sparsity=0.5))
    gm = manager.graph_module
    x = torch.randn(1, 3, 32, 32)
    expected = _outputs(gm, x)[0].numpy()
    result = export_artifact(gm, manager.recipe, tmp_path / "a", ExportConfig(feature_select="matmul"))
    for name in AVAILABLE:
        engine = create_engine(name, result.directory / "model.onnx", batch_size=1, num_cores=1)
        (got,) = engine.run([x.numpy()])
        assert abs(got - expected).max() < 1e-4
        if name == "deepsparse":
            assert engine.fraction_of_supported_ops == 1.0
    assert [r.name for r in manager.recipe.passes] == ["vtp-gates", "vtp-slice", "head-channel-gates",
                                                       "head-channel-slice", "sparsity"]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CI and dev machines have none; runs on a lent GPU machine")
def test_search_runs_on_cuda() -> None:
    loaders = digits_loaders()
    dense = build_model("digits-vit")
    manager = PassManager(trace(dense))
    gm = manager.run(HeadGatePass())
    config = FinetuneConfig(max_steps=3)
    result = search_head_channels(gm, loaders.train, config, 0.3, calibration=loaders.train, teacher=dense,
                                  progress=False)
    assert result.device.startswith("cuda") and next(gm.parameters()).device.type == "cpu"
    reference = copy.deepcopy(gm.cuda())
    manager.run(HeadChannelSlicePass(0.3))
    x = next(iter(loaders.test))[0].cuda()
    assert _max_diff(reference, manager.graph_module, x) < 1e-4
