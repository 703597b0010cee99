"""Saliencies: the ways a mask pass decides which weights to remove (and how to correct the rest).

A saliency is registered by name with the dataclass of its own settings. It receives a
`SaliencyRequest` and returns a keep-mask per target layer; a second-order saliency also updates
the kept weights in place (the OBS correction). `select_masks` is the shared selection step for
saliencies that produce per-weight scores: a pattern, a sparsity and a scope turn scores into masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.fx as fx

from vitsparse.compiler import ViTStructure

from .calibration import Calibration
from .patterns import NOfM, Pattern, lowest_removed, weight_view

Masks = dict[str, torch.Tensor]
SCOPE_NAMES = ("layer", "global")


def check_sparsity(sparsity: float) -> float:
    """A sparsity must be a number in [0, 1); ValueError otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1) (the fraction of weights to remove), got {sparsity}")
    return float(sparsity)


@dataclass
class SaliencyRequest:
    """What a saliency works on: target layers of `gm` (graph order), the goal, and optional data."""

    gm: fx.GraphModule
    structure: ViTStructure
    names: list[str]
    sparsity: float
    pattern: Pattern
    scope: str
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Saliency:
    """A registered saliency: `choose(request, settings) -> masks`, its settings type, its needs."""

    name: str
    choose: Callable[[SaliencyRequest, Any], Masks]
    settings_type: type
    needs_calibration: bool = False
    scopes: tuple[str, ...] = SCOPE_NAMES


SALIENCIES: dict[str, Saliency] = {}


def register_saliency(name: str, settings_type: type, *, needs_calibration: bool = False,
                      scopes: tuple[str, ...] = SCOPE_NAMES) -> Callable:
    """Decorator: register `choose(request, settings)` under `name`."""

    def wrap(choose: Callable[[SaliencyRequest, Any], Masks]) -> Callable[[SaliencyRequest, Any], Masks]:
        SALIENCIES[name] = Saliency(name, choose, settings_type, needs_calibration, scopes)
        return choose

    return wrap


def get_saliency(name: str) -> Saliency:
    try:
        return SALIENCIES[name]
    except KeyError:
        raise ValueError(f"unknown saliency {name!r}; choose one of {sorted(SALIENCIES)}") from None


def make_settings(saliency: Saliency, settings: dict[str, Any] | Any) -> Any:
    """The saliency's settings dataclass from a dict (or the dataclass itself); ValueError names bad keys."""
    if isinstance(settings, saliency.settings_type):
        return settings
    if not isinstance(settings, dict):
        raise ValueError(f"{saliency.name} settings must be a dict or {saliency.settings_type.__name__}, "
                         f"got {type(settings).__name__}")
    known = {f.name for f in fields(saliency.settings_type)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {saliency.name} settings {unknown}; known: {sorted(known)}")
    return saliency.settings_type(**settings)


def weight_scores(gm: fx.GraphModule, names: list[str], score: Callable[[torch.Tensor], torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Per-weight scores (2-D views) of each layer; weights masked out before score -inf (go first)."""
    scores = {}
    for name in names:
        module = gm.get_submodule(name)
        values = score(module.weight.detach()).float()
        mask = getattr(module, "weight_mask", None)
        if mask is not None:
            values = values.masked_fill(~mask, -math.inf)
        scores[name] = weight_view(values)
    return scores


def select_masks(scores: dict[str, torch.Tensor], shapes: dict[str, torch.Size], sparsity: float,
                 pattern: Pattern, scope: str) -> Masks:
    """Keep-masks (in each weight's shape) from 2-D scores: per layer, or one threshold over all layers."""
    for name, values in scores.items():
        pattern.check_shape(name, tuple(values.shape))
    if scope == "layer" or isinstance(pattern, NOfM):
        if scope != "layer":
            raise ValueError(f"pattern {pattern.spec} fixes the sparsity of every group; use scope 'layer'")
        keep = {n: pattern.select(s, pattern.units_to_prune(tuple(s.shape), sparsity))
                for n, s in scores.items()}
    elif scope == "global":
        units = {n: pattern.unit_scores(s) for n, s in scores.items()}
        flat = torch.cat([u.flatten() for u in units.values()])
        flat_keep = lowest_removed(flat, round(sparsity * flat.numel()))
        pieces = flat_keep.split([u.numel() for u in units.values()])
        keep = {n: pattern.expand(p.view_as(units[n])) for n, p in zip(units, pieces, strict=True)}
    else:
        raise ValueError(f"unknown scope {scope!r}; choose one of {list(SCOPE_NAMES)}")
    return {n: k.reshape(shapes[n]) for n, k in keep.items()}


@dataclass(frozen=True)
class NoSettings:
    """Magnitude pruning has no settings of its own."""


@register_saliency("magnitude", NoSettings)
def magnitude_masks(request: SaliencyRequest, settings: NoSettings) -> Masks:
    """Remove the smallest |w| (per unit of the pattern: the sum of |w| over a block)."""
    scores = weight_scores(request.gm, request.names, torch.abs)
    shapes = {n: request.gm.get_submodule(n).weight.shape for n in request.names}
    return select_masks(scores, shapes, request.sparsity, request.pattern, request.scope)
