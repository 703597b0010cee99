"""Vision Transformer Pruning (VTP, Zhu et al. 2021): learn which feature dimensions matter, slice the rest.

Three steps, each usable on its own:

1. `ScoreGatePass` puts a learnable score â (initialised to 1) in front of each site's Linear
   (`vtp_sites.SITES`: qkv input, attention output, fc1 input, MLP hidden).
2. `sparse_train` trains the gated model with the task loss plus λ·‖â‖₁ (optionally distilled).
3. `DimensionSlicePass` ranks |â| over every site at once, removes the `rate` lowest, rounds each
   site's kept count (equal per head for the attention output, a multiple of `multiple` in
   total), folds â into the kept weights and slices the matrices, so the sliced model computes
   what the gated model with the removed scores set to zero computed.

Both passes record what they did; replaying the recipe rebuilds the sliced shapes and the
weights file carries the folded, fine-tuned values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vitsparse.compiler import (
    BlockStructure,
    GraphPass,
    PassError,
    PassRecord,
    PassResult,
    RecipeError,
    ViTStructure,
    find_vit_structure,
    insert_module_before,
    register_pass,
)
from vitsparse.compiler import graph_utils as gu

from .finetune import FinetuneConfig, FinetuneResult, finetune
from .mask_codec import encode_mask, record_masks
from .vtp_sites import SITE_NAMES, SITES, Site, check_sites

DEFAULT_L1 = 1e-4  # the paper's λ
DEFAULT_MULTIPLE = 8


@gu.register_transparent
class ScoreGate(nn.Module):
    """Multiplies each feature of the last dimension by a learnable score (VTP's â)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.score = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.score

    def extra_repr(self) -> str:
        return f"features={self.score.numel()}"


def check_rate(rate: float) -> float:
    if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"pruning rate must lie in [0, 1) (the fraction of scored dimensions removed), "
                         f"got {rate!r}")
    return float(rate)


def check_multiple(multiple: int) -> int:
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
    return multiple


def gate_of(gm: fx.GraphModule, block: BlockStructure, site: Site) -> ScoreGate | None:
    """The score gate right in front of `site`'s Linear in `block`, if there is one."""
    source = gu.module_call(gm, site.consumer(block)).args[0]
    module = gu.module_of(gm, source) if isinstance(source, fx.Node) else None
    return module if isinstance(module, ScoreGate) else None


def site_key(block: BlockStructure, site: Site) -> str:
    return f"{block.index}.{site.name}"


@register_pass
class ScoreGatePass(GraphPass):
    """Insert a score gate (all ones: the outputs do not change) at every chosen site of every block."""

    name = "vtp-gates"

    def __init__(self, sites: tuple[str, ...] | list[str] = SITE_NAMES) -> None:
        self.sites = check_sites(sites)

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        places = [(block, SITES[n]) for block in structure.blocks for n in self.sites]
        for block, site in places:  # every place checked before the graph changes
            reason = site.unsupported(gm, block)
            if reason:
                raise PassError(f"VTP site {site.name} in block {block.index}: {reason}; slicing it "
                                f"would change that norm's statistics. Leave {site.name} out of sites")
            if gate_of(gm, block, site) is not None:
                raise PassError(f"block {block.index} already has a score gate at {site.name}")
        for block, site in places:
            consumer = gu.module_call(gm, site.consumer(block))
            features = gm.get_submodule(site.consumer(block)).in_features
            insert_module_before(gm, consumer, f"vtp_gate_{block.index}_{site.name}", ScoreGate(features))
        return PassResult(gm, PassRecord(self.name, params={"sites": list(self.sites)}))

    @classmethod
    def from_record(cls, record: PassRecord) -> ScoreGatePass:
        try:
            return cls(record.params.get("sites", SITE_NAMES))
        except ValueError as err:
            raise RecipeError(f"{record.name} record: {err}") from None


def score_gates(gm: nn.Module) -> dict[str, ScoreGate]:
    """Every score gate in `gm`, by qualified name."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, ScoreGate)}


def score_l1(gm: nn.Module) -> torch.Tensor:
    """‖â‖₁ over every score gate of `gm` (the sparsity regulariser)."""
    gates = list(score_gates(gm).values())
    if not gates:
        raise PassError("the model has no VTP score gates; run ScoreGatePass first")
    return sum(g.score.abs().sum() for g in gates)


@torch.no_grad()
def scores_from_weight_norms(gm: fx.GraphModule) -> None:
    """Set every gate's scores to its Linear's column norms over their site mean: a data-free stand-in
    for trained scores (speed rows on random weights), which keeps roughly the same rate per site."""
    for block, site, gate in _gated_sites(gm):
        norms = gm.get_submodule(site.consumer(block)).weight.norm(dim=0)
        gate.score.copy_(norms / norms.mean().clamp_min(1e-12))


def sparse_train(gm: fx.GraphModule, train_loader, config: FinetuneConfig, *, l1: float = DEFAULT_L1,
                 teacher: nn.Module | None = None, progress: bool = True) -> FinetuneResult:
    """Train a gated model with the task loss (distilled when `teacher` is given) plus l1·‖â‖₁."""
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    score_l1(gm)  # a clear error before training when there are no gates
    return finetune(gm, train_loader, None, config, teacher=teacher, progress=progress,
                    regularizer=lambda: l1 * score_l1(gm))


def _gated_sites(gm: fx.GraphModule, structure: ViTStructure | None = None
                 ) -> list[tuple[BlockStructure, Site, ScoreGate]]:
    structure = structure if structure is not None else find_vit_structure(gm)
    found = [(b, s, gate_of(gm, b, s)) for b in structure.blocks for s in SITES.values()]
    return [(b, s, g) for b, s, g in found if g is not None]


@dataclass(frozen=True)
class KeepCount:
    """How many features a site keeps (per group) and whether the floor of one step overrode the rate."""

    per_group: int
    floored: bool


def keep_step(multiple: int, groups: int, group_size: int) -> int:
    """Per-group step that keeps the site's total a multiple of `multiple` (capped at the group)."""
    return min(multiple // math.gcd(multiple, groups), group_size)


def round_keep(count: int, size: int, groups: int, multiple: int) -> KeepCount:
    """Round a site's above-threshold count to an equal count per group whose total is a multiple of
    `multiple` (nearest step; a site kept whole stays whole), never below one step per group."""
    group_size = size // groups
    if count >= size:
        return KeepCount(group_size, False)
    step = keep_step(multiple, groups, group_size)
    per_group = step * math.floor(count / groups / step + 0.5)
    return KeepCount(min(group_size, max(step, per_group)), per_group == 0)


def engine_safe_count(per_group: int, groups: int, group_size: int, step: int,
                      unsafe: Callable[[int], bool]) -> int:
    """The nearest per-group count (in steps, ties upward) whose total width `unsafe` accepts."""
    if not unsafe(per_group * groups):
        return per_group
    for distance in range(step, group_size + 1, step):
        for candidate in (per_group + distance, per_group - distance):
            if step <= candidate <= group_size and not unsafe(candidate * groups):
                return candidate
    return per_group


def _kept_indices(scores: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """The `per_group` highest |score| features of each equal-sized group, sorted."""
    magnitude = scores.detach().abs().float().cpu().view(groups, -1)
    top = magnitude.topk(per_group, dim=1).indices.sort(dim=1).values
    return (top + torch.arange(groups).unsqueeze(1) * magnitude.shape[1]).flatten()


def choose_kept(gated: list[tuple[BlockStructure, Site, ScoreGate]], rate: float, multiple: int,
                engine_safe: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global threshold over every |â|, then rounded per-site keep counts (moved off widths a CPU
    engine rejects when `engine_safe`); returns kept indices by site key and what the choice looked
    like (threshold, floored sites, moved sites)."""
    scores = torch.cat([g.score.detach().abs().float().cpu() for _, _, g in gated])
    removed = math.floor(rate * scores.numel())
    order = torch.argsort(scores, stable=True)
    keep_flags = torch.ones(scores.numel(), dtype=torch.bool)
    keep_flags[order[:removed]] = False
    threshold = float(scores[order[removed - 1]]) if removed else None
    kept, floored, moved, offset = {}, [], [], 0
    for block, site, gate in gated:
        size, groups, key = gate.score.numel(), site.groups(block), site_key(block, site)
        count = int(keep_flags[offset:offset + size].sum())
        offset += size
        keep = round_keep(count, size, groups, multiple)
        per_group = keep.per_group
        if engine_safe:
            step = keep_step(multiple, groups, size // groups)
            per_group = engine_safe_count(per_group, groups, size // groups, step, site.engine_unsafe)
        if keep.floored:
            floored.append(key)
        if per_group != keep.per_group:
            moved.append(key)
        kept[key] = _kept_indices(gate.score, groups, per_group)
    if floored:
        warnings.warn(f"VTP rate {rate:g} would remove every dimension of sites {floored}; each keeps the "
                      f"smallest count allowed instead (a multiple of {multiple}, equal per head)",
                      stacklevel=3)
    return kept, {"threshold": threshold, "floored_sites": floored, "engine_safe_moved": moved}


@torch.no_grad()
def _fold_and_remove_gate(gm: fx.GraphModule, block: BlockStructure, site: Site, gate: ScoreGate) -> None:
    """Multiply the scores into the consumer's columns, then route the gate's input straight to it."""
    linear = gm.get_submodule(site.consumer(block))
    linear.weight.mul_(gate.score.to(linear.weight.device, linear.weight.dtype).unsqueeze(0))
    gate_node = gu.module_call(gm, site.consumer(block)).args[0]
    gate_node.replace_all_uses_with(gate_node.args[0])
    gm.graph.erase_node(gate_node)
    gm.delete_submodule(gate_node.target)


@register_pass
class DimensionSlicePass(GraphPass):
    """Remove the `rate` lowest-scored dimensions over every gated site, fold the scores, slice."""

    name = "vtp-slice"

    def __init__(self, rate: float, multiple: int = DEFAULT_MULTIPLE, engine_safe: bool = True,
                 kept: dict[str, torch.Tensor] | None = None) -> None:
        self.rate, self.multiple = check_rate(rate), check_multiple(multiple)
        self.engine_safe = bool(engine_safe)
        self.replay_kept = kept

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        gated = _gated_sites(gm, structure)
        if not gated:
            raise PassError("no VTP score gates in the graph: run ScoreGatePass (and train the scores "
                            "with sparse_train) before DimensionSlicePass")
        stats: dict[str, Any] = {}
        if self.replay_kept is not None:
            kept = self.replay_kept
            missing = sorted(set(kept) ^ {site_key(b, s) for b, s, _ in gated})
            if missing:
                raise RecipeError(f"vtp-slice record does not match the gated sites: {missing[:6]}")
        else:
            kept, stats = choose_kept(gated, self.rate, self.multiple, self.engine_safe)
        decisions = {}
        for block, site, gate in gated:
            key, size = site_key(block, site), gate.score.numel()
            index = kept[key]
            _fold_and_remove_gate(gm, block, site, gate)
            if index.numel() < size:
                site.slice(gm, block, index)
            mask = torch.zeros(size, dtype=torch.bool)
            mask[index] = True
            decisions[key] = {"size": size, "kept": index.numel(), "mask": encode_mask(mask)}
        total = sum(d["size"] for d in decisions.values())
        stats["removed_fraction"] = round(1 - sum(d["kept"] for d in decisions.values()) / total, 6)
        params = {"rate": self.rate, "multiple": self.multiple, "engine_safe": self.engine_safe}
        record = PassRecord(self.name, params=params,
                            decisions={"sites": decisions}, stats=stats)
        return PassResult(gm, record)

    @classmethod
    def from_record(cls, record: PassRecord) -> DimensionSlicePass:
        kept = {key: mask.nonzero().flatten() for key, mask in record_masks(record, "sites", "size").items()}
        try:
            return cls(record.params.get("rate", 0.0), record.params.get("multiple", DEFAULT_MULTIPLE),
                       record.params.get("engine_safe", True), kept)
        except ValueError as err:
            raise RecipeError(f"{record.name} record: {err}") from None
