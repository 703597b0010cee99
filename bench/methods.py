"""The pruning methods prune-and-bench compares, by the names rows carry, and the settings they run at.

A method is a saliency of the shared sparsity pass plus the scope it allocates with: magnitude
and layer-wise OBS prune every layer to the same sparsity (layer-wise OBS solves each layer on
its own), the Fisher solver ranks its losses across layers (oViT's global, correlation-aware
allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitsparse.pruners import SALIENCIES, SparsityConfig, SparsityPass, parse_pattern


@dataclass(frozen=True)
class Method:
    """A saliency, its scope, its solver settings, and which setting says how many images it uses."""

    saliency: str
    scope: str = "layer"
    solver: dict[str, Any] = field(default_factory=dict)
    samples_setting: str | None = None  # obs-layerwise: "samples"; obs-fisher: "num_grads" (1 image each)

    @property
    def needs_calibration(self) -> bool:
        return SALIENCIES[self.saliency].needs_calibration

    def make_pass(
        self,
        sparsity: float | None,
        pattern: str = "unstructured",
        calibration: Any = None,
        samples: int | None = None,
    ) -> SparsityPass:
        """The pass at `sparsity`/`pattern`; a data-aware method uses `samples` calibration images."""
        solver = dict(self.solver)
        if samples is not None and self.samples_setting is not None:
            solver[self.samples_setting] = samples
        return SparsityPass(
            saliency=self.saliency,
            sparsity=sparsity,
            pattern=pattern,
            scope="layer" if parse_pattern(pattern).fixed_sparsity() is not None else self.scope,  # N:M
            solver=solver,
            calibration=calibration if self.needs_calibration else None,
        )


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude"),
    "obs-layerwise": Method("obs-layerwise", samples_setting="samples"),
    "obs-fisher": Method("obs-fisher", scope="global", samples_setting="num_grads"),
}


@dataclass(frozen=True)
class SpeedSetting:
    """A mask setting timed on the speed model: a sparsity and a pattern."""

    sparsity: float
    pattern: str = "unstructured"

    def settings(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": self.pattern}


def parse_speed_setting(text: str) -> SpeedSetting:
    """'0.9' (unstructured), '2:4' (N:M fixes its sparsity) or '0.75@1x4' (sparsity@pattern)."""
    text = text.strip()
    head, at, tail = text.partition("@")
    try:
        if at:
            config = SparsityConfig(sparsity=float(head), pattern=tail)
        elif _is_number(text):
            config = SparsityConfig(sparsity=float(text))
        else:
            config = SparsityConfig(pattern=text)
    except ValueError as err:
        raise ValueError(f"bad speed setting {text!r} (write e.g. 0.9, 2:4 or 0.75@1x4): {err}") from None
    return SpeedSetting(config.sparsity, config.pattern)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
