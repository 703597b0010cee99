"""Gradual pruning: raise the sparsity in steps along a cubic curve, recovering between steps.

The cubic schedule of gradual magnitude pruning (Zhu & Gupta, 2017) removes many weights early,
while the network has plenty to spare, and few near the end: after step k of n the sparsity is
s_k = s_f + (s_0 - s_f)(1 - k/n)^3. Masks only grow, so each step keeps what earlier steps removed;
one-shot pruning is the schedule with one step. Fine-tuning after the last step keeps the masks fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch.fx as fx

from vitsparse.compiler import PassManager

from .masked import mask_sparsity
from .patterns import parse_pattern
from .saliency import check_sparsity
from .sparsity_pass import SparsityConfig, SparsityPass, calibration_for


@dataclass(frozen=True)
class GradualConfig:
    """`steps` pruning steps from `initial_sparsity` (the level before step 1) to the pass's sparsity."""

    steps: int = 4
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        check_sparsity(self.initial_sparsity)


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Target sparsity after each of `steps` steps; the last is `final`, one step is one-shot."""
    final, initial = check_sparsity(final), check_sparsity(initial)
    if initial > final:
        raise ValueError(f"initial sparsity {initial} exceeds the final sparsity {final}")
    GradualConfig(steps, initial)
    return [final + (initial - final) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]


@dataclass
class GradualStep:
    """One step: its target, the sparsity reached over the target layers, and what recovery returned."""

    step: int
    target: float
    reached: float
    recovery: Any = None


Recover = Callable[[fx.GraphModule, int], Any]


def gradual_prune(manager: PassManager, config: SparsityConfig, schedule: GradualConfig,
                  recover: Recover | None = None, calibration: Any = None) -> list[GradualStep]:
    """Prune `manager`'s graph to `config.sparsity` in cubic steps, calling `recover(gm, step)` after
    each step but the last (the caller fine-tunes after the last step with the masks fixed).

    Every step is a recorded `SparsityPass`, so the recipe replays the whole schedule.
    """
    if parse_pattern(config.pattern).fixed_sparsity() is not None and schedule.steps > 1:
        raise ValueError(f"pattern {config.pattern} fixes the sparsity, so it cannot be reached in "
                         f"{schedule.steps} steps; use steps=1 (one-shot)")
    targets = cubic_schedule(config.sparsity, schedule.steps, schedule.initial_sparsity)
    calibration = calibration_for(config, calibration)  # read once: a generator would be empty at step 2
    history = []
    for step, target in enumerate(targets, start=1):
        gm = manager.run(SparsityPass(replace(config, sparsity=target), calibration=calibration))
        reached = _overall_sparsity(gm, manager.recipe.passes[-1].decisions)
        outcome = recover(gm, step) if recover is not None and step < len(targets) else None
        history.append(GradualStep(step, target, reached, outcome))
    return history


def _overall_sparsity(gm: fx.GraphModule, decisions: dict) -> float:
    """Pruned fraction over the layers the step masked, from the installed masks."""
    layers = decisions["layers"]
    per_layer = mask_sparsity(gm)
    pruned = sum(per_layer[name] * layer["numel"] for name, layer in layers.items())
    return pruned / sum(layer["numel"] for layer in layers.values())
