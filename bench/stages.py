"""The stages a recipe file may list, one registered class each: a pass with its settings, or a training
step between passes.

Each stage is a dataclass (its fields are the keys a recipe file may set, checked by `bench/settings.py`)
with what the plan's order check needs:

- `phase`: where it may stand (1 shapes, 2 tokens, 3 masks, 4 INT8; 0 anywhere): phases never go back;
- `prepares`: the pass a training step readies, which must come right after it;
- `after`: a stage that must have run before (quantization-aware training after `int8`).

A new stage is one class here with `@register_stage`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from vitsparse.compiler import PassManager
from vitsparse.pruners import (
    HEAD_CHANNEL_VARIANTS,
    SALIENCIES,
    DimensionSlicePass,
    FinetuneConfig,
    HeadChannelSlicePass,
    HeadGatePass,
    QuantConfig,
    QuantizePass,
    ScoreGatePass,
    SparsityConfig,
    SparsityPass,
    ThresholdConfig,
    TokenDropPass,
    finetune,
    indicators_from_weights,
    learn_thresholds,
    scores_from_weight_norms,
    search_head_channels,
    sparse_train,
)
from vitsparse.pruners.quant_observers import OBSERVERS
from vitsparse.pruners.quantize import DEFAULT_TARGETS
from vitsparse.pruners.schedule import GradualConfig, gradual_prune
from vitsparse.pruners.token_drop import check_locations, default_locations, scale_locations
from vitsparse.pruners.token_thresholds import keep_rate_for_ratio, token_costs
from vitsparse.pruners.vtp import DEFAULT_L1

Augment = Literal["timm", "shift", "none"]  # timm's training transform; whole-pixel shifts; none


@dataclass
class StageContext:
    """What a stage works on: the graph (through its pass manager), the teacher, the data, the seed.

    `loader(augment)` is the shuffled training loader with that augmentation; `prepared` holds what a
    training step leaves for the pass after it (JSON values, kept in the stage checkpoint).
    """

    manager: PassManager
    teacher: nn.Module | None  # None when the starting model's head is new: steps then learn from labels
    loader: Callable[[str], DataLoader]
    calibration: torch.Tensor
    seed: int = 0
    progress: bool = True
    device: str | None = None
    prepared: dict[str, Any] = field(default_factory=dict)


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    STAGES[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Stage:
    kind: ClassVar[str] = ""
    phase: ClassVar[int] = 0
    prepares: ClassVar[str | None] = None
    after: ClassVar[str | None] = None

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        raise NotImplementedError

    def training_epochs(self) -> int:
        """Training epochs this stage runs (0 for a pass)."""
        return 0

    def settings(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class Training(Stage):
    """Settings every training step shares: distillation from the dense model is on by default."""

    epochs: int = 4
    lr: float = 1e-3
    distill: bool = True
    augment: Augment = "timm"
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        if self.epochs < self.min_epochs():
            raise ValueError(f"epochs must be >= {self.min_epochs()}, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def min_epochs(self) -> int:
        return 1

    def training_epochs(self) -> int:
        return self.epochs

    def config(self, ctx: StageContext, epochs: int | None = None) -> FinetuneConfig:
        return FinetuneConfig(
            epochs=epochs or self.epochs,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            seed=ctx.seed,
            device=ctx.device,
        )

    def teacher(self, ctx: StageContext) -> nn.Module | None:
        return ctx.teacher if self.distill else None

    def tune(self, ctx: StageContext, epochs: int | None = None) -> None:
        finetune(
            ctx.manager.graph_module,
            ctx.loader(self.augment),
            None,
            self.config(ctx, epochs),
            teacher=self.teacher(ctx),
            progress=ctx.progress,
        )


@register_stage
@dataclass(frozen=True)
class VtpScores(Training):
    """VTP's soft scores per dimension, trained with λ·‖â‖₁ (0 epochs: from weight norms, no data)."""

    kind: ClassVar[str] = "vtp-scores"
    phase: ClassVar[int] = 1
    prepares: ClassVar[str | None] = "vtp-slice"
    l1: float = DEFAULT_L1

    def min_epochs(self) -> int:
        return 0

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        gated = ctx.manager.run(ScoreGatePass())
        if self.epochs == 0:
            scores_from_weight_norms(gated)
            return
        sparse_train(
            gated,
            ctx.loader(self.augment),
            self.config(ctx),
            l1=self.l1,
            teacher=self.teacher(ctx),
            progress=ctx.progress,
        )


@register_stage
@dataclass(frozen=True)
class VtpSlice(Stage):
    """Slice the dimensions whose trained scores fall below the global threshold at `rate`."""

    kind: ClassVar[str] = "vtp-slice"
    phase: ClassVar[int] = 1
    rate: float = 0.2
    multiple: int = 16  # 16: DeepSparse's sparse kernels need masked widths in multiples of 16

    def __post_init__(self) -> None:
        _check_fraction("rate", self.rate)
        _check_multiple(self.multiple)

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        ctx.manager.run(DimensionSlicePass(self.rate, self.multiple))


@register_stage
@dataclass(frozen=True)
class HeadSearch(Training):
    """Head-equal channel indicators trained toward the next slice's budget (0 epochs: weight norms)."""

    kind: ClassVar[str] = "head-search"
    phase: ClassVar[int] = 1
    prepares: ClassVar[str | None] = "head-channel-slice"
    variant: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in HEAD_CHANNEL_VARIANTS:
            raise ValueError(
                f"variant must be one of {', '.join(HEAD_CHANNEL_VARIANTS)}, got {self.variant!r}"
            )

    def min_epochs(self) -> int:
        return 0

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        gated = ctx.manager.run(HeadGatePass(HEAD_CHANNEL_VARIANTS[self.variant].gate_mode))
        if self.epochs == 0:
            indicators_from_weights(gated)
            return
        assert isinstance(following, HeadChannelSlice)  # the plan's order check holds it
        search_head_channels(
            gated,
            ctx.loader(self.augment),
            self.config(ctx),
            following.budget,
            variant=self.variant,
            multiple=following.multiple,
            calibration=ctx.calibration,
            teacher=self.teacher(ctx),
            progress=ctx.progress,
        )


@register_stage
@dataclass(frozen=True)
class HeadChannelSlice(Stage):
    """Remove the same number of q/k and v channels from every head: `budget` fewer attention MACs."""

    kind: ClassVar[str] = "head-channel-slice"
    phase: ClassVar[int] = 1
    budget: float = 0.3
    multiple: int = 16

    def __post_init__(self) -> None:
        _check_fraction("budget", self.budget)
        _check_multiple(self.multiple)

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        ctx.manager.run(HeadChannelSlicePass(self.budget, self.multiple))


@register_stage
@dataclass(frozen=True)
class TokenThresholds(Training):
    """AS-ViT's thresholds learned with the weights toward the next stage's FLOPs ratio (given, or the
    ratio its static keep rate gives)."""

    kind: ClassVar[str] = "token-thresholds"
    phase: ClassVar[int] = 2
    prepares: ClassVar[str | None] = "token-drop"

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        assert isinstance(following, TokenDrop)
        manager = ctx.manager
        probe = PassManager(copy.deepcopy(manager.graph_module))
        probe.run(following.static_pass(manager))
        ratio = following.flops_ratio or probe.costs.macs / manager.costs.macs
        locations = tuple(probe.recipe.passes[-1].params["locations"])
        learned = learn_thresholds(
            manager.graph_module,
            ctx.loader(self.augment),
            ThresholdConfig(ratio, locations),
            self.config(ctx),
            ctx.calibration,
            teacher=self.teacher(ctx),
            progress=ctx.progress,
        )
        ctx.prepared["token_thresholds"] = [float(t) for t in learned.thresholds]
        ctx.prepared["token_locations"] = list(locations)


@register_stage
@dataclass(frozen=True)
class TokenDrop(Stage):
    """Drop tokens after chosen blocks: a static keep rate (`keep_rate`, or the one that reaches
    `flops_ratio` = pruned / unpruned MACs), or the thresholds learned just before.

    `locations` are blocks of a 12-block model (scaled to the model's depth); none: AS-ViT's."""

    kind: ClassVar[str] = "token-drop"
    phase: ClassVar[int] = 2
    keep_rate: float | None = None
    flops_ratio: float | None = None
    locations: tuple[int, ...] | None = None
    fuse: bool = False

    def __post_init__(self) -> None:
        if (self.keep_rate is None) == (self.flops_ratio is None):
            raise ValueError("keep_rate or flops_ratio: give exactly one")
        _check_fraction(
            "keep_rate" if self.flops_ratio is None else "flops_ratio",
            self.keep_rate if self.flops_ratio is None else self.flops_ratio,
        )

    def static_pass(self, manager: PassManager) -> TokenDropPass:
        """Static selection at the keep rate given, or at the one that reaches the FLOPs ratio."""
        structure = manager.structure
        depth = structure.depth
        reference = (
            default_locations(depth) if self.locations is None else scale_locations(self.locations, depth)
        )
        locations = check_locations(reference, depth)
        rate = self.keep_rate
        if rate is None:
            costs = token_costs(manager.graph_module, structure)
            rate = round(
                keep_rate_for_ratio(costs, locations, structure.num_prefix_tokens, self.flops_ratio), 4
            )
        return TokenDropPass(rate, locations, fuse=self.fuse)

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        thresholds = ctx.prepared.pop("token_thresholds", None)
        if thresholds is None:
            ctx.manager.run(self.static_pass(ctx.manager))
            return
        locations = ctx.prepared.pop("token_locations")
        ctx.manager.run(
            TokenDropPass(
                thresholds=thresholds, locations=locations, fuse=self.fuse, calibration=ctx.calibration
            )
        )


@register_stage
@dataclass(frozen=True)
class Sparsity(Training):
    """Weight masks (magnitude or second-order) in `steps` cubic steps, `epochs` of recovery between."""

    kind: ClassVar[str] = "sparsity"
    phase: ClassVar[int] = 3
    epochs: int = 0  # recovery after each step but the last
    saliency: str = "magnitude"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    scope: Literal["layer", "global"] = "layer"
    solver: dict[str, Any] = field(default_factory=dict)
    steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.saliency not in SALIENCIES:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCIES)}, got {self.saliency!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.mask_config()  # sparsity, pattern and solver settings checked where they are defined

    def min_epochs(self) -> int:
        return 0

    def training_epochs(self) -> int:
        return (self.steps - 1) * self.epochs

    def mask_config(self) -> SparsityConfig:
        return SparsityConfig(
            saliency=self.saliency,
            sparsity=self.sparsity,
            pattern=self.pattern,
            scope=self.scope,
            solver=self.solver,
        )

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        config = self.mask_config()
        if self.steps == 1:
            ctx.manager.run(SparsityPass(config, calibration=ctx.calibration))
            return
        recover = (lambda gm, step: self.tune(ctx)) if self.epochs else None
        gradual_prune(
            ctx.manager, config, GradualConfig(steps=self.steps), recover=recover, calibration=ctx.calibration
        )


@register_stage
@dataclass(frozen=True)
class Int8(Stage):
    """Static INT8: symmetric per-channel weights, activation ranges calibrated on training images."""

    kind: ClassVar[str] = "int8"
    phase: ClassVar[int] = 4
    observer: str = "percentile"
    patch_embed: bool = False
    calibration_images: int = 256

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        if self.calibration_images < 1:
            raise ValueError(f"calibration_images must be >= 1, got {self.calibration_images}")

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        targets = DEFAULT_TARGETS + (("patch_embed",) if self.patch_embed else ())
        config = QuantConfig(
            targets=targets, observer=self.observer, calibration_images=self.calibration_images
        )
        ctx.manager.run(QuantizePass(config, calibration=ctx.calibration))


@register_stage
@dataclass(frozen=True)
class Finetune(Training):
    """Train every weight, masks kept (distilled from the dense model unless `distill: false`)."""

    kind: ClassVar[str] = "finetune"

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        self.tune(ctx)


@register_stage
@dataclass(frozen=True)
class Qat(Training):
    """Quantization-aware fine-tuning after `int8`: a gentle lr keeps the calibrated ranges valid."""

    kind: ClassVar[str] = "qat"
    after: ClassVar[str | None] = "int8"
    lr: float = 1e-4

    def run(self, ctx: StageContext, following: Stage | None) -> None:
        self.tune(ctx)


def _check_fraction(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{key} must lie strictly between 0 and 1, got {value}")


def _check_multiple(value: int) -> None:
    if value < 1:
        raise ValueError(f"multiple must be >= 1, got {value}")
