"""Where VTP scores and slices feature dimensions: one registered site per place in a block.

A site names the Linear whose *input* features it scores (the gate sits right in front of it),
how many groups must keep equal counts (the heads, for the attention output) and how to slice
the graph once the kept features are known. Sites never touch the residual stream's width, so
prefix tokens, layer scale, q/k norms, pooling and heads are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from vitsparse.compiler import (
    BlockStructure,
    select_input_features,
    slice_linear,
    slice_value_heads,
)
from vitsparse.compiler import graph_utils as gu


@dataclass(frozen=True)
class Site:
    """A pruning site of a block: the Linear it feeds, its head groups and its slicing rewrite."""

    name: str
    description: str
    consumer: Callable[[BlockStructure], str]
    groups: Callable[[BlockStructure], int]
    slice: Callable[[fx.GraphModule, BlockStructure, torch.Tensor], None]
    unsupported: Callable[[fx.GraphModule, BlockStructure], str | None] = lambda gm, block: None
    engine_unsafe: Callable[[int], bool] = lambda width: False  # widths a CPU engine is known to reject


SITES: dict[str, Site] = {}


def register_site(site: Site) -> Site:
    SITES[site.name] = site
    return site


def check_sites(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The site names, validated: unknown or repeated names are a ValueError listing the known ones."""
    names = tuple(names)
    unknown = [n for n in names if n not in SITES]
    if unknown or not names or len(set(names)) != len(names):
        problem = f"unknown sites {unknown}" if unknown else f"sites must be distinct and non-empty: {names}"
        raise ValueError(f"{problem}; choose from {', '.join(SITES)}")
    return names


def _norm_between(gm: fx.GraphModule, consumer: str, stop: str) -> str | None:
    """A norm on the path from node `stop` down to Linear `consumer` (its statistics would change if
    the features it normalises were sliced), else None."""
    node = gu.module_call(gm, consumer).args[0]
    while isinstance(node, fx.Node) and node.name != stop:
        if gu.is_norm(gm, node):
            return node.target
        if not gu.is_passthrough(gm, node):
            return None
        node = node.args[0]
    return None


def _attn_out_unsupported(gm: fx.GraphModule, block: BlockStructure) -> str | None:
    norm = _norm_between(gm, block.attn.proj, block.attn.out_reshape_node)
    return f"a norm ({norm}) normalises the attention output before proj" if norm else None


def _mlp_hidden_unsupported(gm: fx.GraphModule, block: BlockStructure) -> str | None:
    norm = block.mlp.norm
    return f"a norm ({norm}) normalises the MLP hidden features before fc2" if norm else None


def _slice_value_heads(gm: fx.GraphModule, block: BlockStructure, kept: torch.Tensor) -> None:
    attn = block.attn
    per_head = kept.view(attn.num_heads, -1) - (torch.arange(attn.num_heads) * attn.v_head_dim).unsqueeze(1)
    slice_value_heads(gm, attn, per_head)


def _slice_mlp_hidden(gm: fx.GraphModule, block: BlockStructure, kept: torch.Tensor) -> None:
    slice_linear(gm, block.mlp.fc1, out_keep=kept)
    slice_linear(gm, block.mlp.fc2, in_keep=kept)


def deepsparse_rejects_hidden(width: int) -> bool:
    """DeepSparse 1.8.0 aborts compiling fc1 → GELU → fc2 when the hidden width is 1–16 above a
    multiple of 64 (an assertion inside DeepSparse's fused MLP kernel)."""
    return 1 <= width % 64 <= 16


def _one_group(block: BlockStructure) -> int:
    return 1


def _input_site(name: str, layer: str, linear: Callable[[BlockStructure], str]) -> Site:
    """A site of a Linear's input features, read from a norm that keeps normalising all of them."""
    return Site(name, f"input features of {layer} (the norm still sees every feature)",
                consumer=linear, groups=_one_group,
                slice=lambda gm, b, kept: select_input_features(gm, linear(b), kept))


register_site(_input_site("qkv_in", "the qkv projection", lambda b: b.attn.qkv))
register_site(Site(
    "attn_out", "attention output feeding proj: v rows and proj columns, equal per head",
    consumer=lambda b: b.attn.proj, groups=lambda b: b.attn.num_heads,
    slice=_slice_value_heads, unsupported=_attn_out_unsupported,
))
register_site(_input_site("mlp_in", "fc1", lambda b: b.mlp.fc1))
register_site(Site(
    "mlp_hidden", "MLP hidden features: fc1 rows and bias, fc2 columns",
    consumer=lambda b: b.mlp.fc2, groups=_one_group,
    slice=_slice_mlp_hidden, unsupported=_mlp_hidden_unsupported, engine_unsafe=deepsparse_rejects_hidden,
))

SITE_NAMES: tuple[str, ...] = tuple(SITES)
