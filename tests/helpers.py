"""Test-only helpers: small random-weight ViTs and a minimal structured pass built on the rewrite helpers."""

from __future__ import annotations

import timm
import torch
import torch.fx as fx

from vitsparse.compiler import (
    GraphPass,
    PassRecord,
    PassResult,
    ViTStructure,
    register_pass,
    slice_linear,
)

# the structure matrix (at depth 2 in the tests): plain, layer scale, q/k norm, distilled, registers,
# average pooling without a class token
STRUCTURE_VARIANTS: list[tuple[str, dict]] = [
    ("deit_tiny_patch16_224", {}),
    ("deit3_small_patch16_224", {}),
    ("vit_small_patch16_224", {"qk_norm": True}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {"reg_tokens": 4}),
    ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
]
STRUCTURE_IDS = [f"{name}-{'-'.join(kwargs) or 'plain'}" for name, kwargs in STRUCTURE_VARIANTS]


def small_vit(name: str = "deit_tiny_patch16_224", *, fused: bool = True, seed: int = 0,
              **kwargs) -> torch.nn.Module:
    """A random-weight timm ViT at a small image size, with fused or explicit attention."""
    torch.manual_seed(seed)
    kwargs.setdefault("img_size", 32)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


@register_pass
class MlpHiddenSlice(GraphPass):
    """Keep the given MLP hidden channels per block: fc1 rows and fc2 columns (a test-sized VTP)."""

    name = "test-mlp-hidden-slice"

    def __init__(self, kept: dict[int, list[int]]) -> None:
        self.kept = kept

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        for block in structure.blocks:
            if block.index in self.kept:
                slice_linear(gm, block.mlp.fc1, out_keep=self.kept[block.index])
                slice_linear(gm, block.mlp.fc2, in_keep=self.kept[block.index])
        decisions = {"kept": {str(i): list(k) for i, k in self.kept.items()}}
        return PassResult(gm, PassRecord(self.name, decisions=decisions))

    @classmethod
    def from_record(cls, record: PassRecord) -> MlpHiddenSlice:
        return cls({int(i): list(k) for i, k in record.decisions["kept"].items()})


def zero_mlp_channels(model: torch.nn.Module, block: int, channels: list[int]) -> None:
    """Zero fc1 rows/bias and fc2 columns of `channels`, so removing them cannot change outputs."""
    mlp = model.blocks[block].mlp
    with torch.no_grad():
        mlp.fc1.weight[channels] = 0
        mlp.fc1.bias[channels] = 0
        mlp.fc2.weight[:, channels] = 0


# Python source that makes `import torch` fail, run first in a subprocess: a CPU server without torch.
BLOCK_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, BlockTorch())
"""
