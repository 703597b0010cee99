"""Token dropping (AS-ViT), static keep counts: identity, the recomputed class-token row, export, errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from vitsparse.compiler import (
    ExportConfig,
    PassError,
    PassManager,
    Recipe,
    count_costs,
    export_artifact,
    replay,
    trace,
)
from vitsparse.pruners import ClassAttentionScore, TokenDropPass, TokenSelect
from vitsparse.pruners.token_drop import default_locations, keep_counts, scale_locations
from vitsparse.runtime import ENGINES, create_engine, engine_status

from helpers import STRUCTURE_IDS, STRUCTURE_VARIANTS, small_vit

AVAILABLE = [name for name in ENGINES if engine_status(name).available]
WITH_CLASS_TOKEN = [v for v in STRUCTURE_VARIANTS if v[1].get("class_token", True)]
WITH_CLASS_TOKEN_IDS = [i for v, i in zip(STRUCTURE_VARIANTS, STRUCTURE_IDS, strict=True)
                        if v[1].get("class_token", True)]


def _dropped(model: torch.nn.Module, keep_rate: float, locations=None) -> PassManager:
    manager = PassManager(trace(model), recipe=Recipe())
    manager.run(TokenDropPass(keep_rate, locations))
    return manager


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("variant", WITH_CLASS_TOKEN, ids=WITH_CLASS_TOKEN_IDS)
def test_keeping_every_token_is_the_identity(variant, fused: bool) -> None:
    name, kwargs = variant
    model = small_vit(name, fused=fused, depth=3, img_size=64, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        manager = _dropped(model, 1.0, (1, 2))
        got = manager.graph_module(x)
    assert torch.equal(got, expected)
    assert manager.structure.depth == 3  # the structure is still found through the selections
    assert manager.recipe.passes[-1].decisions == {"kept_tokens": [16, 16]}


def test_recomputed_class_token_row_equals_the_explicit_attention_row() -> None:
    """Fused attention recomputes q_cls·Kᵀ; it equals row 0 of the spelled-out softmax."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    probs = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(dim=-1)
    fused = ClassAttentionScore(1, 8**-0.5, fused=True).class_attention(q, k)
    explicit = ClassAttentionScore(1, 8**-0.5, fused=False).class_attention(q, probs)
    assert torch.allclose(fused, explicit, atol=1e-6) and torch.equal(explicit, probs[:, :, 0])


@pytest.mark.parametrize("variant", WITH_CLASS_TOKEN, ids=WITH_CLASS_TOKEN_IDS)
def test_fused_and_explicit_models_drop_the_same_tokens(variant) -> None:
    """Same weights, fused vs spelled-out attention: the same scores, so the same tokens and outputs."""
    name, kwargs = variant
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for fused in (True, False):
        manager = _dropped(small_vit(name, fused=fused, depth=3, img_size=64, **kwargs), 0.5, (1, 2))
        with torch.no_grad():
            outputs.append(manager.graph_module(x))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_scores_weigh_class_attention_by_head_output_norms() -> None:
    """Two heads: the one with the larger output at a token counts more there."""
    probs = torch.tensor([[[[0.0, 0.9, 0.1]], [[0.0, 0.1, 0.9]]]]).expand(1, 2, 3, 3)  # (B, H, N, N)
    head_out = torch.ones(1, 2, 3, 4)
    head_out[:, 1] *= 3.0  # head 1's output is three times head 0's everywhere
    score = ClassAttentionScore(1, 1.0, fused=False)(None, probs, head_out)
    assert torch.allclose(score, torch.tensor([[0.25 * 0.9 + 0.75 * 0.1, 0.25 * 0.1 + 0.75 * 0.9]]))


def test_selection_keeps_prefix_tokens_and_the_highest_scores_per_image() -> None:
    tokens = torch.arange(2 * 6 * 1, dtype=torch.float).view(2, 6, 1)
    score = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.0], [0.3, 0.2, 0.1, 0.8, 0.9]])
    kept = TokenSelect(2, num_prefix_tokens=1)(tokens, score)
    assert kept[:, 0, 0].tolist() == [0.0, 6.0]  # the class token of each image
    assert sorted(kept[0, 1:, 0].tolist()) == [2.0, 3.0] and sorted(kept[1, 1:, 0].tolist()) == [10.0, 11.0]


def test_dropping_cuts_macs_and_replays_from_the_recipe() -> None:
    model = small_vit(depth=6, img_size=64)
    manager = _dropped(model, 0.7)
    record = manager.recipe.passes[-1]
    assert record.params == {"keep_rate": 0.7, "locations": [2, 4, 5], "fuse": False, "mode": "fixed"}
    assert record.params["locations"] == list(default_locations(6))
    assert record.decisions["kept_tokens"] == list(keep_counts(16, 0.7, 3)) == [11, 8, 6]
    assert record.stats["tokens_per_stage"] == [16, 11, 8, 6]
    assert count_costs(manager.graph_module).macs < 0.8 * count_costs(trace(model)).macs
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(replay(model, manager.recipe)(x), manager.graph_module(x))


def test_fusing_appends_the_score_weighted_mean_of_the_dropped_tokens() -> None:
    tokens = torch.arange(2 * 5 * 2, dtype=torch.float).view(2, 5, 2)
    score = torch.tensor([[0.1, 0.9, 0.3, 0.6], [0.5, 0.2, 0.1, 0.2]])
    fused = TokenSelect(2, num_prefix_tokens=1, fuse=True)(tokens, score)
    assert fused.shape == (2, 4, 2)
    assert torch.equal(fused[:, :3], TokenSelect(2, num_prefix_tokens=1)(tokens, score))
    dropped = tokens[0, [1, 3]]  # patches 0 and 2 of image 0 (scores 0.1 and 0.3)
    assert torch.allclose(fused[0, 3], (0.1 * dropped[0] + 0.3 * dropped[1]) / 0.4)
    assert keep_counts(16, 0.7, 3, fuse=True) == (11, 8, 6) and keep_counts(10, 0.5, 2, fuse=True) == (5, 3)


def test_fused_dropping_replays_and_exports(tmp_path) -> None:
    model = small_vit(depth=6, img_size=64)
    manager = PassManager(trace(model), recipe=Recipe())
    manager.run(TokenDropPass(0.5, fuse=True))
    assert manager.recipe.passes[-1].decisions["kept_tokens"] == [8, 4, 2]
    assert manager.recipe.passes[-1].stats["tokens_per_stage"] == [16, 9, 5, 3]
    assert sum(isinstance(m, TokenSelect) and m.fuse for m in manager.graph_module.modules()) == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(replay(model, manager.recipe)(x), manager.graph_module(x))
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "fused",
                             ExportConfig(batch_size=2))
    assert result.max_abs_diff < 1e-4


def test_default_locations_follow_as_vit_and_scale_with_depth() -> None:
    assert default_locations(12) == (4, 7, 10)
    assert default_locations(24) == (8, 14, 20)
    assert default_locations(2) == (1,) and default_locations(1) == ()


@pytest.mark.slow
def test_static_selection_exports_and_matches_torch_on_every_engine(tmp_path) -> None:
    """TopK + Gather with constant k, batch 1 and 4; DeepSparse runs at least 90 % of the graph."""
    manager = _dropped(small_vit(depth=6, img_size=64), 0.7)
    for batch in (1, 4):
        result = export_artifact(manager.graph_module, manager.recipe, tmp_path / str(batch),
                                 ExportConfig(batch_size=batch))
        assert result.max_abs_diff < 1e-4
        ops = [n.op_type for n in onnx.load(str(result.directory / "model.onnx")).graph.node]
        assert ops.count("TopK") == 3
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = manager.graph_module(x).numpy()
        for name in AVAILABLE:
            engine = create_engine(name, result.directory / "model.onnx", batch_size=batch, num_cores=1)
            (got,) = engine.run([x.numpy()])
            assert abs(got - expected).max() < 1e-4
            if name == "deepsparse":
                assert engine.fraction_of_supported_ops >= 0.9


CHILD_RUN = """
import os, sys
import numpy as np
os.environ["NM_DISABLE_ANALYTICS"] = "1"
from vitsparse.runtime import create_engine
engine = create_engine(sys.argv[1], sys.argv[2], batch_size=2, num_cores=1)
np.save(sys.argv[4], engine.run([np.load(sys.argv[3])])[0])
"""


@pytest.mark.slow
def test_fused_dropping_runs_batched_on_every_engine(tmp_path) -> None:
    """Ranking every token and gathering the dropped rows aborted DeepSparse 1.8's compiler at batch 2
    (pyramid.cpp:3344); the fused token is one masked product now. Each engine runs in a child process,
    since such an abort takes its process down."""
    manager = PassManager(trace(small_vit(depth=2, img_size=32)), recipe=Recipe())
    manager.run(TokenDropPass(0.4, fuse=True))
    result = export_artifact(manager.graph_module, manager.recipe, tmp_path / "fused",
                             ExportConfig(batch_size=2))
    x = torch.randn(2, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        expected = manager.graph_module(x).numpy()
    for name in AVAILABLE:
        out = tmp_path / f"{name}.npy"
        child = subprocess.run([sys.executable, "-c", CHILD_RUN, name, str(result.directory / "model.onnx"),
                                str(tmp_path / "x.npy"), str(out)], capture_output=True, text=True)
        output = (child.stdout + child.stderr).splitlines()
        said = [line for line in output if "Assert" in line or "rror" in line]
        assert child.returncode == 0, f"{name} failed: {said[:3]}"
        assert abs(np.load(out) - expected).max() < 1e-4


def test_stage_locations_scale_from_twelve_blocks() -> None:
    assert scale_locations((1, 4, 7), 12) == (1, 4, 7) and scale_locations((1, 4, 7), 6) == (1, 2, 4)
    assert scale_locations((1, 4, 7), 2) == (1,) and scale_locations((4, 7, 10), 1) == ()
    assert scale_locations((10, 11), 24) == (20, 22)


@pytest.mark.parametrize("keep_rate", [0.0, 1.5, -0.2, True, "0.7"])
def test_keep_rate_outside_zero_one_is_a_clear_error(keep_rate) -> None:
    with pytest.raises(ValueError, match=r"keep_rate must lie in \(0, 1\]"):
        TokenDropPass(keep_rate)


@pytest.mark.parametrize("locations,message", [
    ((3,), r"outside blocks 1..2 of this 3-block model"),
    ((0,), r"outside blocks 1..2"),
    ((2, 1), "strictly increasing"),
    ((1, 1), "strictly increasing"),
    ((), "must be block indices"),
    ((1.5,), "must be block indices"),
])
def test_bad_locations_are_clear_errors(locations, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _dropped(small_vit(depth=3), 0.7, locations)


def test_models_without_a_class_token_and_double_dropping_are_refused() -> None:
    with pytest.raises(PassError, match="class token's attention; this model pools 'avg'"):
        _dropped(small_vit("vit_small_patch16_224", depth=2, class_token=False, global_pool="avg"), 0.7)
    with pytest.raises(PassError, match="needs at least two blocks"):
        _dropped(small_vit(depth=1), 0.7)
    manager = _dropped(small_vit(depth=3), 0.7, (1,))
    with pytest.raises(PassError, match="already drops tokens"):
        manager.run(TokenDropPass(0.5, (2,)))


@pytest.mark.parametrize("fuse", [False, True])
def test_a_copy_of_a_dropped_graph_keeps_its_structure(fuse: bool) -> None:
    """A deep copy lists a node's users in another order; the attention output feeds both the projection
    and the next token score, and the structure must still find the projection (INT8 quantizes a copy)."""
    manager = PassManager(trace(small_vit(depth=4)), recipe=Recipe())
    manager.run(TokenDropPass(0.5, (1, 2), fuse=fuse))
    copied = PassManager(copy.deepcopy(manager.graph_module))
    assert [b.attn.proj for b in copied.structure.blocks] == [b.attn.proj for b in manager.structure.blocks]
    assert copied.costs.macs == manager.costs.macs
