"""find_vit_structure on every timm ViT variant the compiler claims, with fused and explicit attention."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from vitsparse.compiler import NotAViTError, TraceFailure, find_vit_structure, trace

from helpers import small_vit

# (timm name, timm kwargs, what the structure must report); depth 4 keeps the matrix fast
VARIANTS = [
    ("deit_tiny_patch16_224", {}, dict(depth=4, heads=3, embed=192, prefix=1, pool="token")),
    ("deit_small_patch16_224", {}, dict(depth=4, heads=6, embed=384, prefix=1, pool="token")),
    ("deit_base_patch16_224", {}, dict(depth=4, heads=12, embed=768, prefix=1, pool="token")),
    ("vit_small_patch16_224", {}, dict(depth=4, heads=6, embed=384, prefix=1, pool="token")),
    ("deit_small_distilled_patch16_224", {}, dict(depth=4, heads=6, embed=384, prefix=2, pool="token",
                                                  n_heads=2)),
    ("vit_base_patch32_224", {"img_size": 64}, dict(depth=4, heads=12, embed=768, prefix=1, pool="token")),
    ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"},
     dict(depth=4, heads=6, embed=384, prefix=0, pool="avg")),
    ("vit_small_patch16_224", {"reg_tokens": 4}, dict(depth=4, heads=6, embed=384, prefix=5, pool="token")),
    ("deit3_small_patch16_224", {}, dict(depth=4, heads=6, embed=384, prefix=1, pool="token",
                                         layer_scale=True)),
    ("vit_small_patch16_224", {"qk_norm": True}, dict(depth=4, heads=6, embed=384, prefix=1, pool="token",
                                                      qk_norm=True)),
]


def _residual_tensors_by_timm_names(model: nn.Module) -> set[str]:
    """The residual-stream tensors listed from timm's own attribute names: an oracle for the pattern match."""
    names = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "head.weight"}
    names |= {f"norm.{p}" for p in ("weight", "bias") if isinstance(model.norm, nn.LayerNorm)}
    names |= {t for t in ("cls_token", "dist_token", "reg_token") if getattr(model, t, None) is not None}
    names |= {f"fc_norm.{p}" for p in ("weight", "bias") if isinstance(model.fc_norm, nn.LayerNorm)}
    names |= {"head_dist.weight"} if hasattr(model, "head_dist") else set()
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                 "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.weight", "mlp.fc2.bias"]
    for i, block in enumerate(model.blocks):
        names |= {f"blocks.{i}.{p}" for p in per_block}
        names |= {f"blocks.{i}.{ls}.gamma" for ls in ("ls1", "ls2") if hasattr(getattr(block, ls), "gamma")}
    return names


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("name,kwargs,expected", VARIANTS,
                         ids=[f"{n}{'-' + '-'.join(k) if k else ''}" for n, k, _ in VARIANTS])
def test_structure_matrix(name: str, kwargs: dict, expected: dict, fused: bool) -> None:
    model = small_vit(name, fused=fused, depth=4, **kwargs)  # full depth is covered by test_costs
    gm = trace(model)
    x = torch.randn(2, *gm.meta["vitsparse_input_shape"])
    assert torch.equal(gm(x), model(x)), "tracing must not change the computation"

    s = find_vit_structure(gm)
    assert s.depth == expected["depth"]
    assert s.embed_dim == expected["embed"]
    assert s.num_prefix_tokens == expected["prefix"] == model.num_prefix_tokens
    assert s.num_patches == model.patch_embed.num_patches
    assert s.pool == expected["pool"]
    assert len(s.heads) == expected.get("n_heads", 1)
    for block, timm_block in zip(s.blocks, model.blocks, strict=True):
        attn = block.attn
        assert (attn.num_heads, attn.head_dim) == (expected["heads"], expected["embed"] // expected["heads"])
        assert attn.fused is fused
        assert attn.scale == pytest.approx(timm_block.attn.scale)
        assert torch.equal(gm.get_submodule(attn.qkv).weight, timm_block.attn.qkv.weight)
        assert torch.equal(gm.get_submodule(block.mlp.fc2).weight, timm_block.mlp.fc2.weight)
        assert (block.layer_scale1 is not None) == expected.get("layer_scale", False)
        assert (attn.q_norm is not None) == (attn.k_norm is not None) == expected.get("qk_norm", False)
        assert block.mlp.hidden_dim == timm_block.mlp.fc1.out_features

    params = dict(gm.named_parameters())
    for coupled in s.residual_coupled:
        assert params[coupled.name].shape[coupled.dim] == s.embed_dim, coupled
    assert {c.name for c in s.residual_coupled} == _residual_tensors_by_timm_names(model)


def test_structure_describe_mentions_every_block() -> None:
    s = find_vit_structure(trace(small_vit(depth=3)))
    text = s.describe()
    assert "embed_dim 192" in text and text.count("block ") == 3


def test_resnet_is_rejected_with_a_clear_error() -> None:
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(TraceFailure, match="input_shape"):
        trace(resnet)
    gm = trace(resnet, input_shape=(3, 32, 32))
    with pytest.raises(NotAViTError, match=r"no self-attention found.*Expected a Vision Transformer.*Conv2d"):
        find_vit_structure(gm)


def test_block_without_mlp_is_rejected() -> None:
    model = small_vit(depth=2)
    model.blocks[1].mlp = nn.Identity()
    with pytest.raises(NotAViTError, match="block 1: expected norm → fc1 Linear"):
        find_vit_structure(trace(model))


def test_non_module_is_rejected() -> None:
    with pytest.raises(TraceFailure, match="expected a torch.nn.Module"):
        trace(lambda x: x)  # type: ignore[arg-type]


def test_untraceable_model_gives_one_clear_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceFailure, match="torch.fx could not trace DataDependent"):
        trace(DataDependent(), input_shape=(3, 8, 8))


def test_builtin_digits_vit_is_found() -> None:
    from vitsparse.models import build_model

    s = find_vit_structure(trace(build_model("digits-vit", pretrained=False)))
    found = (s.input_shape, s.depth, s.embed_dim, s.num_patches, s.num_prefix_tokens)
    assert found == ((1, 8, 8), 6, 64, 16, 1)
    assert {(b.attn.num_heads, b.attn.head_dim) for b in s.blocks} == {(4, 16)}
