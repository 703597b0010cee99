"""Unstructured magnitude pruning: mask the smallest |w| per layer or globally over the target layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from vitsparse.compiler import PassRecord, RecipeError, ViTStructure, register_pass

from .mask_codec import masks_from_decisions
from .mask_pass import MaskPass
from .targets import DEFAULT_TARGETS, check_target_kinds, select_targets

Scores = dict[str, torch.Tensor]


def check_sparsity(sparsity: float) -> float:
    """A sparsity must be a number in [0, 1); ValueError otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1) (the fraction of weights to remove), got {sparsity}")
    return float(sparsity)


def keep_mask(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Flat keep-mask removing exactly `prune` entries of lowest score (ties: lowest index first)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if prune:
        mask[torch.argsort(scores.flatten(), stable=True)[:prune]] = False
    return mask


def layer_scope(scores: Scores, sparsity: float) -> Scores:
    """round(sparsity * n) weights removed from each layer."""
    return {n: keep_mask(s, round(sparsity * s.numel())).view_as(s) for n, s in scores.items()}


def global_scope(scores: Scores, sparsity: float) -> Scores:
    """round(sparsity * N) weights removed over all layers together, wherever the smallest are."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = keep_mask(flat, round(sparsity * flat.numel()))
    pieces = keep.split([s.numel() for s in scores.values()])
    return {n: piece.view_as(s) for (n, s), piece in zip(scores.items(), pieces, strict=True)}


SCOPES: dict[str, Callable[[Scores, float], Scores]] = {"layer": layer_scope, "global": global_scope}


@dataclass(frozen=True)
class MagnitudeConfig:
    """sparsity in [0, 1); scope "layer" (uniform) or "global"; targets: layer kinds (see TARGET_KINDS)."""

    sparsity: float = 0.5
    scope: str = "layer"
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {sorted(SCOPES)}")
        object.__setattr__(self, "targets", check_target_kinds(self.targets))


def magnitude_scores(gm: fx.GraphModule, names: list[str]) -> Scores:
    """|w| of each layer, with weights already masked out scoring 0 (so they stay pruned)."""
    scores = {}
    for name in names:
        module = gm.get_submodule(name)
        weight = module.weight.detach()
        mask = getattr(module, "weight_mask", None)
        scores[name] = (weight * mask if mask is not None else weight).abs().float()
    return scores


@register_pass
class MagnitudePass(MaskPass):
    """Mask the smallest-magnitude weights of the attention and MLP linears (configurable targets)."""

    name = "magnitude"

    def __init__(self, config: MagnitudeConfig | None = None, *, masks: dict[str, torch.Tensor] | None = None,
                 **settings) -> None:
        if config is not None and settings:
            raise ValueError(f"give either a MagnitudeConfig or settings {sorted(settings)}, not both")
        if config is not None and not isinstance(config, MagnitudeConfig):
            raise ValueError(f"MagnitudePass takes a MagnitudeConfig or keyword settings "
                             f"(sparsity=..., scope=..., targets=...), got {config!r}")
        self.config = config if config is not None else MagnitudeConfig(**settings)
        super().__init__(masks)

    def choose_masks(self, gm: fx.GraphModule, structure: ViTStructure) -> Scores:
        names = select_targets(structure, self.config.targets)
        return SCOPES[self.config.scope](magnitude_scores(gm, names), self.config.sparsity)

    def params(self) -> dict:
        settings = asdict(self.config)
        settings["targets"] = list(self.config.targets)
        return settings

    @classmethod
    def from_record(cls, record: PassRecord) -> MagnitudePass:
        try:
            config = MagnitudeConfig(**record.params)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"magnitude record has bad params {record.params}: {err}") from None
        return cls(config, masks=masks_from_decisions(record.decisions))
