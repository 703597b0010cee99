"""What head-channel indicators start from: attention difference, channel similarity, or weight norms.

The first two read calibration activations at the gates (q, k and v as the attention core sees them):

- attention difference (the indicator initialisation): for a q–k channel, the mean absolute change
  of the attention probabilities when that channel alone is removed from q·kᵀ; for a v channel,
  the mean magnitude of its column of the attention output (which is what removing it changes).
- channel similarity: 1 − the mean |cosine| between a channel's activations and the other channels'
  of its head, softened (`SIMILARITY_STRENGTH`) and normalised to mean 1 per head; a channel much
  like the others carries less.

`weight_importance` is the data-free stand-in for a random-weight model (speed rows): q–k pairs by
‖q row‖·‖k row‖ of qkv, v channels by ‖v row‖·‖proj column‖.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from vitsparse.compiler import AttentionStructure, ViTStructure
from vitsparse.compiler import graph_utils as gu
from vitsparse.compiler.attention_rewrite import key_input

from .head_gates import HeadChannelGate, gate_inputs, gate_key, qk_groups

SIMILARITY_STRENGTH = 0.25  # weights^0.25 (0.6–2.3 → 0.88–1.23): they tilt the indicators, not replace them


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.name in self.names:
            self.values[node.name] = value.detach().float().cpu()
        return value


def _explicit_score_nodes(gm: fx.GraphModule, attention: AttentionStructure
                          ) -> tuple[fx.Node, fx.Node] | None:
    """(q·kᵀ matmul, softmax input) of spelled-out attention, else None."""
    core = gu.node_by_name(gm, attention.core_node)
    if gu.is_sdpa(core):
        return None
    return gu.walk_up(core, gu.is_matmul, 8), core.args[0]


def _ungated(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """What a head-channel gate multiplies (the node itself where there is no gate)."""
    return node.args[0] if isinstance(gu.module_of(gm, node), HeadChannelGate) else node


def _nodes_to_record(gm: fx.GraphModule, structure: ViTStructure) -> dict[int, dict[str, fx.Node]]:
    nodes = {}
    for block in structure.blocks:
        inputs = gate_inputs(gm, block.attn)
        found = {"q": _ungated(gm, inputs["qk"]), "k": key_input(gm, block.attn),
                 "v": _ungated(gm, inputs["v"])}
        explicit = _explicit_score_nodes(gm, block.attn)
        if explicit is not None:
            found["product"], found["scores"] = explicit
        nodes[block.index] = found
    return nodes


@torch.no_grad()
def record_attention(gm: fx.GraphModule, structure: ViTStructure, images: torch.Tensor
                     ) -> dict[int, dict[str, torch.Tensor]]:
    """Per block, for one batch: q, k (kᵀ in spelled-out attention) and v as the attention core sees
    them before any gate (and the scores of spelled-out attention)."""
    nodes = _nodes_to_record(gm, structure)
    recorder = _Recorder(gm, {n.name for found in nodes.values() for n in found.values()})
    was_training = gm.training
    gm.eval()
    try:
        recorder.run(images.to(next(gm.parameters()).device))
    finally:
        gm.train(was_training)
    return {i: {k: recorder.values[n.name] for k, n in found.items()} for i, found in nodes.items()}


def _scores(values: dict[str, torch.Tensor], attention: AttentionStructure
            ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(q, kᵀ, factor) with softmax(factor · q @ kᵀ) the attention probabilities."""
    q = values["q"]
    if "product" not in values:  # fused: k as (B, H, N, d), scale applied inside the core
        return q, values["k"].transpose(-1, -2), float(attention.scale)
    product, scores = values["product"], values["scores"]
    factor = float((scores * product).sum() / (product * product).sum().clamp_min(1e-30))
    return q, values["k"], factor


def attention_difference(values: dict[str, torch.Tensor], attention: AttentionStructure
                         ) -> dict[str, torch.Tensor]:
    """How much each q–k channel changes the attention map and each v channel the attention output,
    as (groups, width) means over one batch, for the block's two gates."""
    q, key_t, factor = _scores(values, attention)
    scores = factor * (q @ key_t)
    probs = scores.softmax(dim=-1)
    qk = torch.empty(q.shape[1], q.shape[-1])
    for channel in range(q.shape[-1]):
        without = scores - factor * (q[..., channel:channel + 1] @ key_t[..., channel:channel + 1, :])
        qk[:, channel] = (probs - without.softmax(dim=-1)).abs().mean(dim=(0, 2, 3))
    if qk_groups(attention) == 1:
        qk = qk.mean(dim=0, keepdim=True)
    v = (probs @ values["v"]).abs().mean(dim=(0, 2))
    return {"qk": qk, "v": v}


def _per_group(activations: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, N, width) → (groups, B·N·H/groups, width): each head's tokens, or all heads' when shared."""
    heads = activations.permute(1, 0, 2, 3).flatten(1, 2)
    return heads.flatten(0, 1).unsqueeze(0) if groups == 1 else heads


def channel_grams(values: dict[str, torch.Tensor], attention: AttentionStructure
                  ) -> dict[str, list[torch.Tensor]]:
    """Per gate, the (groups, width, width) Gram matrices of one batch's channel activations (a q–k
    pair's q and k separately), summed over batches for the similarity weights."""
    key = values["k"] if "product" not in values else values["k"].transpose(-1, -2)
    groups = qk_groups(attention)
    gram = [(a.transpose(1, 2) @ a) for a in (_per_group(values["q"], groups), _per_group(key, groups))]
    v = _per_group(values["v"], attention.num_heads)
    return {"qk": gram, "v": [v.transpose(1, 2) @ v]}


def similarity_weights(grams: list[torch.Tensor]) -> torch.Tensor:
    """(groups, width): 1 − the mean |cosine| to the group's other channels (averaged over the Gram
    matrices given, e.g. a pair's q and k), softened and normalised to mean 1 per group."""
    cosines = []
    for gram in grams:
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()
        cosines.append((gram / (norms.unsqueeze(2) * norms.unsqueeze(1))).abs())
    cosine = sum(cosines) / len(cosines)
    width = cosine.shape[-1]
    mean_other = (cosine.sum(dim=-1) - cosine.diagonal(dim1=1, dim2=2)) / max(width - 1, 1)
    weights = (1 - mean_other).clamp_min(1e-3) ** SIMILARITY_STRENGTH
    return weights / weights.mean(dim=1, keepdim=True)


@dataclass
class AttentionSignals:
    """Per gate key: the attention difference (mean over the images) and the similarity weights."""

    difference: dict[str, torch.Tensor]
    similarity: dict[str, torch.Tensor]


def measure_signals(gm: fx.GraphModule, structure: ViTStructure, batches: Iterable[torch.Tensor]
                    ) -> AttentionSignals:
    """Stream calibration batches through a gated graph, one at a time (memory stays one batch's)."""
    differences: dict[str, torch.Tensor] = {}
    grams: dict[str, list[torch.Tensor]] = {}
    images = 0
    for batch in batches:
        recorded = record_attention(gm, structure, batch)
        for block in structure.blocks:
            values = recorded[block.index]
            for kind, difference in attention_difference(values, block.attn).items():
                key = gate_key(block.index, kind)
                differences[key] = differences.get(key, 0) + difference * batch.shape[0]
            for kind, found in channel_grams(values, block.attn).items():
                key = gate_key(block.index, kind)
                summed = grams.get(key)
                grams[key] = found if summed is None else [g + f for g, f in zip(summed, found, strict=True)]
        images += batch.shape[0]
    if not images:
        raise ValueError("no calibration images to measure the attention with")
    return AttentionSignals({k: d / images for k, d in differences.items()},
                            {k: similarity_weights(g) for k, g in grams.items()})


@torch.no_grad()
def weight_importance(gm: fx.GraphModule, attention: AttentionStructure) -> dict[str, torch.Tensor]:
    """Data-free importances (groups, width): ‖q row‖·‖k row‖ per q–k pair, ‖v row‖·‖proj column‖ per v."""
    heads, width, v_width = attention.num_heads, attention.head_dim, attention.v_head_dim
    rows = gm.get_submodule(attention.qkv).weight.float().norm(dim=1).cpu()
    q, k = rows[:heads * width].view(heads, width), rows[heads * width:2 * heads * width].view(heads, width)
    v = rows[2 * heads * width:].view(heads, v_width)
    proj = gm.get_submodule(attention.proj).weight.float().norm(dim=0).cpu().view(heads, v_width)
    qk = q * k
    if qk_groups(attention) == 1:
        qk = qk.mean(dim=0, keepdim=True)
    return {"qk": qk, "v": v * proj}


def indicators_from(signals: dict[str, torch.Tensor], low: float, high: float) -> dict[str, torch.Tensor]:
    """Map signals (by gate key) to indicators in [low, high], each kind scaled by its largest value
    over the whole model, so blocks where channels matter less are pruned first."""
    out = {}
    for kind in ("qk", "v"):
        keys = [k for k in signals if k.endswith(f".{kind}")]
        largest = max(float(signals[k].max()) for k in keys) or 1.0
        out.update({k: low + (high - low) * signals[k] / largest for k in keys})
    return out

