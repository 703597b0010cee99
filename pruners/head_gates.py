"""Pruning indicators for head-equal channel removal (Lee & Hwang 2024), in front of the attention core.

Every block gets two `HeadChannelGate`s: one on q, whose channels stand for q–k channel pairs (they
meet in the dot product, so scaling q's channel scales the pair), and one on v. A gate holds, per
channel of every head (or per channel shared by every head, when a q/k norm shares its weights
across heads):

- `indicator`: the learnable pruning indicator. In `mask` mode the forward multiplies by a hard keep
  mask (set by the budgeted selection) whose gradient flows straight through σ(indicator); in `scale`
  mode (the plain-L1 ablation) it multiplies by the indicator itself, as VTP's scores do (and by the
  keep mask, all ones until a selection is set).
- `reweight`: a learnable scale on the kept channels (the reweight module), folded into the weights
  when the pass slices, so it costs nothing at inference.
- `similarity`: channel-similarity weights from calibration activations; a channel much like the
  others in its head gets a lower weight, so the more informative channels are kept.

`importance()` is what the selection ranks: σ(indicator)·similarity (mask) or |indicator| (scale).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from vitsparse.compiler import (
    AttentionStructure,
    BlockStructure,
    GraphPass,
    PassError,
    PassRecord,
    PassResult,
    RecipeError,
    ViTStructure,
    register_pass,
)
from vitsparse.compiler import graph_utils as gu
from vitsparse.compiler.attention_rewrite import query_input, value_input

from .vtp_sites import SITES

GATE_MODES = ("mask", "scale")
INDICATOR_GAIN = 30.0  # indicator = gain × raw parameter: AdamW moves it `gain` times faster than weights
DEFAULT_INDICATOR = 2.5  # σ = 0.92: every channel kept and ranked alike until training or the init says


class HeadChannelGate(nn.Module):
    """Multiplies the channels of a (B, heads, N, width) tensor by per-head (or shared) factors."""

    def __init__(self, groups: int, width: int, mode: str = "mask") -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        self.groups, self.width, self.mode = groups, width, mode
        # flat 1-D parameters: the fine-tune loop applies no weight decay to them
        initial = DEFAULT_INDICATOR / INDICATOR_GAIN if mode == "mask" else 1.0
        self.raw_indicator = nn.Parameter(torch.full((groups * width,), initial))
        self.reweight = nn.Parameter(torch.ones(groups * width))
        self.register_buffer("keep", torch.ones(groups, width))
        self.register_buffer("similarity", torch.ones(groups, width))

    @property
    def indicator(self) -> torch.Tensor:
        """The indicator per (group, channel)."""
        gain = INDICATOR_GAIN if self.mode == "mask" else 1.0
        return (self.raw_indicator * gain).view(self.groups, self.width)

    @torch.no_grad()
    def set_indicator(self, values: torch.Tensor) -> None:
        gain = INDICATOR_GAIN if self.mode == "mask" else 1.0
        self.raw_indicator.copy_(values.reshape(-1).to(self.raw_indicator) / gain)

    def factors(self) -> torch.Tensor:
        """What the forward multiplies by, per (group, channel)."""
        if self.mode == "scale":
            return self.indicator * self.keep
        soft = torch.sigmoid(self.indicator)
        return (self.keep + soft - soft.detach()) * self.reweight.view(self.groups, self.width)

    def fold_factors(self) -> torch.Tensor:
        """The scale each kept channel carries into the weights when the gate is folded away."""
        values = self.indicator if self.mode == "scale" else self.reweight.view(self.groups, self.width)
        return values.detach()

    def importance(self) -> torch.Tensor:
        """What the selection ranks, per (group, channel): higher is kept first."""
        if self.mode == "scale":
            return self.indicator.detach().abs()
        return torch.sigmoid(self.indicator.detach()) * self.similarity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factors().unsqueeze(-2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, width={self.width}, mode={self.mode}"


def gate_key(block: int, kind: str) -> str:
    return f"{block}.{kind}"


def gate_inputs(gm: fx.GraphModule, attention: AttentionStructure) -> dict[str, fx.Node]:
    """The nodes feeding q ("qk") and v ("v") into a block's attention core."""
    return {"qk": query_input(gm, attention), "v": value_input(gm, attention)}


def gates_of(gm: fx.GraphModule, attention: AttentionStructure) -> dict[str, HeadChannelGate]:
    """The head-channel gates in front of a block's attention core, by kind ("qk", "v")."""
    found = {}
    for kind, node in gate_inputs(gm, attention).items():
        module = gu.module_of(gm, node)
        if isinstance(module, HeadChannelGate):
            found[kind] = module
    return found


def all_gates(gm: fx.GraphModule, structure: ViTStructure) -> dict[str, HeadChannelGate]:
    """Every block's gates by key "block.kind"; PassError when a block lacks them."""
    gates = {}
    for block in structure.blocks:
        found = gates_of(gm, block.attn)
        if not found:
            raise PassError(f"block {block.index} has no head-channel gates: run HeadGatePass first")
        gates.update({gate_key(block.index, kind): gate for kind, gate in found.items()})
    return gates


def qk_groups(attention: AttentionStructure) -> int:
    """Heads that choose q/k channels on their own: all of them, or one set shared by every head when a
    q/k norm (whose weights every head shares) sits between qkv and the attention."""
    return 1 if attention.q_norm or attention.k_norm else attention.num_heads


def _check_block(gm: fx.GraphModule, block: BlockStructure) -> None:
    attention, index = block.attn, block.index
    if gates_of(gm, attention):
        raise PassError(f"block {index} already has head-channel gates")
    if attention.q_norm is not None and getattr(gm.get_submodule(attention.q_norm), "weight", None) is None:
        raise PassError(f"block {index}: the q norm {attention.q_norm} has no affine weight to absorb the "
                        "kept channels' scales")
    norm = SITES["attn_out"].unsupported(gm, block)
    if norm:
        raise PassError(f"block {index}: {norm}; removing v channels would change its statistics")
    for kind, node in gate_inputs(gm, attention).items():
        shape = node.meta.get("tensor_meta")
        if shape is None or len(shape.shape) != 4 or shape.shape[1] != attention.num_heads:
            raise PassError(f"block {index}: expected {kind} as (batch, {attention.num_heads} heads, tokens, "
                            "channels) at the attention core; cannot find its heads")


@register_pass
class HeadGatePass(GraphPass):
    """Insert a q (q–k pair) gate and a v gate before every block's attention core; outputs unchanged."""

    name = "head-channel-gates"

    def __init__(self, mode: str = "mask") -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        self.mode = mode

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        for block in structure.blocks:  # every block checked before the graph changes
            _check_block(gm, block)
        for block in structure.blocks:
            attn = block.attn
            shapes = {"qk": (qk_groups(attn), attn.head_dim), "v": (attn.num_heads, attn.v_head_dim)}
            core = gu.node_by_name(gm, attn.core_node)
            device = gm.get_submodule(attn.qkv).weight.device  # a model on the GPU gets its gates there
            for kind, source in gate_inputs(gm, attn).items():
                consumer = next(u for u in source.users if u is core or gu.is_matmul(u))
                target = f"head_gate_{block.index}_{kind}"
                gm.add_submodule(target, HeadChannelGate(*shapes[kind], self.mode).to(device))
                with gm.graph.inserting_before(consumer):
                    gate_node = gm.graph.call_module(target, (source,))
                consumer.replace_input_with(source, gate_node)
        return PassResult(gm, PassRecord(self.name, params={"mode": self.mode}))

    @classmethod
    def from_record(cls, record: PassRecord) -> HeadGatePass:
        try:
            return cls(record.params.get("mode", "mask"))
        except ValueError as err:
            raise RecipeError(f"{record.name} record: {err}") from None
