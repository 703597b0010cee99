"""MAC and parameter counting against published figures."""

from __future__ import annotations

import timm

from vitsparse.compiler import count_costs, find_vit_structure, trace

from helpers import small_vit


def test_deit_small_macs_match_the_published_4_6_g() -> None:
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    gm = trace(model)
    report = count_costs(gm)
    assert abs(report.macs - 4.6e9) / 4.6e9 < 0.02, report.macs  # DeiT paper / timm: 4.6 G "FLOPs" (MACs)
    assert report.params == sum(p.numel() for p in model.parameters()) == 22_050_664
    assert find_vit_structure(gm).depth == 12  # the full-depth model is found block by block


def test_attention_matmuls_are_counted_for_fused_and_explicit_attention() -> None:
    fused = count_costs(trace(small_vit(depth=2, fused=True)))
    explicit = count_costs(trace(small_vit(depth=2, fused=False)))
    assert fused.macs == explicit.macs
    tokens, dim = 5, 192  # 4 patches + class token at 32x32
    attention = 2 * 2 * tokens * tokens * dim  # q·kᵀ and attn·v, two blocks
    linear = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * 4 * dim)
    patch = 4 * 3 * 16 * 16 * dim
    assert fused.macs == attention + linear + patch + dim * 1000
