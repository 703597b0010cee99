"""Which channels head-equal pruning keeps: equal counts in every head, chosen to meet a MAC budget.

Each block has two channel groups, q–k pairs and v. Removing one q–k channel from every head saves
H·(2·N·C + N²) MACs per image (its q and k rows of qkv and its share of q·kᵀ); removing one v
channel saves H·(N·C + N² + N·P) (its v row, its share of attention·v and its column of proj). The
selection starts from every channel and greedily removes the step (one `multiple`-friendly count
of channels from every head) whose summed importance per saved MAC is lowest, across all blocks,
until the attention MACs are at most (1 − budget) of where they started. Every head keeps at least
one step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.fx as fx

from vitsparse.compiler import PassError, ViTStructure
from vitsparse.compiler import graph_utils as gu
from vitsparse.compiler.shapes import shape_of

from .head_gates import HeadChannelGate, all_gates, gate_inputs, gate_key
from .vtp import keep_step


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 1:
        raise ValueError(f"budget must lie in [0, 1) (the fraction of attention MACs to remove), "
                         f"got {budget!r}")
    return float(budget)


@dataclass
class ChannelGroup:
    """One block's q–k or v channels: importance per (group, channel) and what a step of them costs."""

    key: str
    heads: int
    importance: torch.Tensor  # (groups, width); groups is heads, or 1 when shared by every head
    macs_per_channel: int  # per head, per image
    step: int
    kept: int  # per head

    @property
    def width(self) -> int:
        return self.importance.shape[1]

    @property
    def macs(self) -> int:
        return self.heads * self.kept * self.macs_per_channel

    def next_step_cost(self) -> float | None:
        """Importance lost per MAC saved by removing one more step (None: a head would empty)."""
        if self.kept - self.step < self.step:
            return None
        ordered = self.importance.sort(dim=1).values
        removed = ordered[:, self.width - self.kept:self.width - self.kept + self.step]
        per_head = float(removed.sum()) * self.heads / self.importance.shape[0]
        return per_head / (self.step * self.heads * self.macs_per_channel)

    def kept_channels(self) -> torch.Tensor:
        """(groups, kept) indices of the most important channels of every head, sorted."""
        return self.importance.topk(self.kept, dim=1).indices.sort(dim=1).values


def channel_groups(gm: fx.GraphModule, structure: ViTStructure, multiple: int,
                   gates: dict[str, HeadChannelGate] | None = None) -> list[ChannelGroup]:
    """Every block's q–k and v groups with the importance their gates give (propagated shapes needed)."""
    gates = gates if gates is not None else all_gates(gm, structure)
    groups = []
    for block in structure.blocks:
        attn = block.attn
        tokens = shape_of(gate_inputs(gm, attn)["qk"])[-2]
        embed = gm.get_submodule(attn.qkv).in_features
        out = gm.get_submodule(attn.proj).out_features
        cost = {"qk": 2 * tokens * embed + tokens * tokens,
                "v": tokens * embed + tokens * tokens + tokens * out}
        for kind in ("qk", "v"):
            gate = gates[gate_key(block.index, kind)]
            importance = gate.importance().float().cpu()
            step = keep_step(multiple, attn.num_heads, gate.width)  # equal per head, total in multiples
            groups.append(ChannelGroup(gate_key(block.index, kind), attn.num_heads, importance, cost[kind],
                                       step, gate.width))
    return groups


def allocate(groups: list[ChannelGroup], budget: float) -> float:
    """Remove steps greedily until the groups' MACs are at most (1 − budget) of where they started;
    returns the fraction removed. PassError when the budget would empty a head."""
    start = sum(g.macs for g in groups)
    target = (1 - check_budget(budget)) * start
    heap = [(cost, i) for i, g in enumerate(groups) if (cost := g.next_step_cost()) is not None]
    heapq.heapify(heap)
    total = start
    while total > target and heap:
        _, index = heapq.heappop(heap)
        group = groups[index]
        group.kept -= group.step
        total -= group.step * group.heads * group.macs_per_channel
        cost = group.next_step_cost()
        if cost is not None:
            heapq.heappush(heap, (cost, index))
    if total > target:
        reachable = 1 - total / start
        raise PassError(f"a budget of {budget:.0%} fewer attention MACs would empty heads: keeping at least "
                        f"one step of channels per head (a multiple-friendly count, here "
                        f"{min(g.step for g in groups)}) removes at most {reachable:.1%}; lower the budget "
                        "or the multiple")
    return 1 - total / start


def choose_head_channels(gm: fx.GraphModule, structure: ViTStructure, budget: float, multiple: int
                         ) -> tuple[dict[str, torch.Tensor], float]:
    """The kept (groups, kept) channels of every gate, by key, and the fraction of attention MACs removed."""
    groups = channel_groups(gm, structure, multiple)
    removed = allocate(groups, budget)
    return {g.key: g.kept_channels() for g in groups}, removed


@torch.no_grad()
def set_keep_masks(gm: fx.GraphModule, kept: dict[str, torch.Tensor], structure: ViTStructure) -> None:
    """Make every gate's hard keep mask the given selection."""
    for key, gate in all_gates(gm, structure).items():
        mask = torch.zeros(gate.groups, gate.width, device=gate.keep.device)
        mask.scatter_(1, kept[key].to(gate.keep.device), 1.0)
        gate.keep.copy_(mask)


def gate_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(gu.module_of(gm, n), HeadChannelGate)]
