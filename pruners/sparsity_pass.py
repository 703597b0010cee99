"""The mask pass every saliency shares: a sparsity, a pattern, a scope, and the layers it touches.

`SparsityPass(saliency="obs-layerwise", sparsity=0.75, pattern="1x4", calibration=images)` chooses
masks with the named saliency (magnitude, or a second-order solver that also corrects the kept
weights), installs them as masked layers and records them. Replay installs the recorded masks;
the corrected weights travel in the artifact's weights file, like any fine-tuned weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx

from vitsparse.compiler import (
    PassRecord,
    PassResult,
    RecipeError,
    ViTStructure,
    input_shape_of,
    register_pass,
)

from .calibration import Calibration, make_calibration
from .mask_codec import masks_from_decisions
from .mask_pass import MaskPass
from .patterns import Pattern, check_mask_pattern, parse_pattern, weight_view
from .saliency import SCOPE_NAMES, SaliencyRequest, check_sparsity, get_saliency, make_settings
from .targets import DEFAULT_TARGETS, check_target_kinds, select_targets


@dataclass(frozen=True)
class SparsityConfig:
    """What to remove and how to choose it.

    `sparsity` may be left out for an N:M pattern (which fixes it); `solver` holds the saliency's own
    settings (see `LayerwiseObsSettings`, `FisherObsSettings`), validated when the config is made.
    """

    saliency: str = "magnitude"
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "layer"
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    solver: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        saliency = get_saliency(self.saliency)
        pattern = parse_pattern(self.pattern)
        if self.scope not in SCOPE_NAMES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {list(SCOPE_NAMES)}")
        if self.scope not in saliency.scopes:
            raise ValueError(f"saliency {self.saliency} supports scope {list(saliency.scopes)}, "
                             f"not {self.scope!r}")
        object.__setattr__(self, "targets", check_target_kinds(self.targets))
        fixed = pattern.fixed_sparsity()
        if self.sparsity is None and fixed is None:
            raise ValueError(f"give a sparsity in [0, 1) for pattern {pattern.spec}")
        sparsity = check_sparsity(fixed if self.sparsity is None else self.sparsity)
        if fixed is not None and self.scope != "layer":
            raise ValueError(f"pattern {pattern.spec} fixes the sparsity of every group; use scope 'layer'")
        if fixed is not None and abs(sparsity - fixed) > 1e-9:
            raise ValueError(f"pattern {pattern.spec} fixes the sparsity at {fixed:g}; got {sparsity:g}")
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "pattern", pattern.spec)
        object.__setattr__(self, "solver", asdict(make_settings(saliency, dict(self.solver))))


@register_pass
class SparsityPass(MaskPass):
    """Mask the target layers with the configured saliency and pattern; optional calibration data."""

    name = "sparsity"

    def __init__(self, config: SparsityConfig | None = None, *, calibration: Any = None,
                 masks: dict[str, torch.Tensor] | None = None, **settings) -> None:
        if config is not None and settings:
            raise ValueError(f"give either a SparsityConfig or settings {sorted(settings)}, not both")
        if config is not None and not isinstance(config, SparsityConfig):
            raise ValueError(f"{type(self).__name__} takes a SparsityConfig or keyword settings "
                             f"(sparsity=..., pattern=..., scope=..., targets=...), got {config!r}")
        self.config = config if config is not None else self.make_config(**settings)
        saliency = get_saliency(self.config.saliency)
        if masks is None and saliency.needs_calibration and calibration is None:
            raise ValueError(f"saliency {saliency.name} needs calibration data: pass calibration=<images "
                             f"tensor, DataLoader or iterable of batches>")
        self.calibration = None if masks is not None else calibration_for(self.config, calibration)
        super().__init__(masks)

    @classmethod
    def make_config(cls, **settings) -> SparsityConfig:
        return SparsityConfig(**settings)

    def choose_masks(self, gm: fx.GraphModule, structure: ViTStructure) -> dict[str, torch.Tensor]:
        """Run the saliency; if it fails half-way, the weights it already corrected are put back."""
        saliency = get_saliency(self.config.saliency)
        names = select_targets(structure, self.config.targets)
        pattern = parse_pattern(self.config.pattern)
        _check_earlier_masks(gm, names, pattern)
        _check_images(gm, self.calibration)
        request = SaliencyRequest(gm, structure, names, self.config.sparsity, pattern, self.config.scope,
                                  self.calibration)
        saved = {name: gm.get_submodule(name).weight.detach().clone() for name in names}
        try:
            return saliency.choose(request, make_settings(saliency, self.config.solver))
        except BaseException:
            with torch.no_grad():
                for name, weight in saved.items():
                    gm.get_submodule(name).weight.copy_(weight)
            raise

    def params(self) -> dict:
        settings = asdict(self.config)
        settings["targets"] = list(self.config.targets)
        return settings

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        result = super().__call__(gm, structure)
        if self.calibration is not None and self.replay_masks is None:
            result.record.stats["calibration_samples"] = self.calibration.num_samples
        return result

    @classmethod
    def from_record(cls, record: PassRecord) -> SparsityPass:
        try:
            config = cls.make_config(**record.params)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{record.name} record has bad params {record.params}: {err}") from None
        return cls(config, masks=masks_from_decisions(record.decisions))


def calibration_for(config: SparsityConfig, data: Any) -> Calibration | None:
    """The calibration images `config`'s saliency will use, read once and no more than it needs
    (a solver's `calibration_images`), so a large DataLoader is not read to its end."""
    if data is None:
        return None
    saliency = get_saliency(config.saliency)
    needed = getattr(make_settings(saliency, config.solver), "calibration_images", None)
    return make_calibration(data, needed)


def _check_earlier_masks(gm: fx.GraphModule, names: list[str], pattern: Pattern) -> None:
    """Masks only grow, so a layer masked weight by weight cannot become a 1xK block pattern (an N:M
    pattern can: removing more weights keeps every group at most N non-zeros)."""
    if pattern.unit == 1:
        return
    for name in names:
        mask = getattr(gm.get_submodule(name), "weight_mask", None)
        if mask is None:
            continue
        pattern.check_shape(name, tuple(weight_view(mask).shape))
        if not check_mask_pattern(mask, pattern):
            raise ValueError(f"{name} already has a mask that is not a {pattern.spec} pattern, and masks "
                             f"only grow; prune with {pattern.spec} from the start (or keep the earlier "
                             f"pattern)")


def _check_images(gm: fx.GraphModule, calibration: Calibration | None) -> None:
    """ValueError when the calibration images do not have the (C, H, W) the graph was traced at."""
    if calibration is None:
        return
    expected = tuple(input_shape_of(gm))
    for images, _ in calibration:
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"calibration images have shape {tuple(images.shape[1:])} (C, H, W); the model "
                             f"was traced for {expected}")
