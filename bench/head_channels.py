"""Head-equal channel rows: the method and its ablations on digits-vit, its shapes timed on the speed model.

On digits-vit every (budget, variant) is run with several seeds (the test split has 270 images: one
image is 0.37 points, and seeds move the fine-tuned top-1 by about a point), each searched,
sliced and fine-tuned with distillation from the dense model; the row holds the mean top-1 of each
stage and the per-seed figures. The speed model has random weights and nothing to train on, so its
indicators come from weight norms (`indicators_from_weights`): those rows time the shapes a budget
yields, they claim nothing about accuracy.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import (
    HEAD_CHANNEL_VARIANTS,
    HeadChannelSlicePass,
    HeadGatePass,
    finetune,
    indicators_from_weights,
    search_head_channels,
)
from vitsparse.pruners.head_channels import CALIBRATION_IMAGES, DEFAULT_MULTIPLE
from vitsparse.pruners.head_select import choose_head_channels

from .accuracy import MODEL, digits_finetune_config, export_row, make_row, over_seeds, seeded_train_loader
from .schema import Row

METHOD = "head-channels"


@dataclass(frozen=True)
class HeadChannelSetting:
    """A budget (fraction of attention MACs removed) and the variant of the method."""

    budget: float
    variant: str = "full"

    def settings(self) -> dict:
        return {"budget": self.budget, "variant": self.variant}


def check_settings(budgets: tuple[float, ...], variants: tuple[str, ...]) -> None:
    """ValueError for a budget outside [0, 1) or an unknown variant, before any work starts."""
    if any(isinstance(b, bool) or not 0 <= b < 1 for b in budgets):
        raise ValueError(f"head-channel budgets must lie in [0, 1), got {budgets}")
    unknown = [v for v in variants if v not in HEAD_CHANNEL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown head-channel variants {unknown}; choose from "
                         f"{', '.join(HEAD_CHANNEL_VARIANTS)}")


@dataclass
class SeedRun:
    """One seed of a setting: its recipe and fine-tuned model, top-1 after each stage, seconds spent
    choosing the channels (search and slice)."""

    manager: PassManager
    tuned: torch.nn.Module
    searched: float
    sliced: float
    finetuned: float
    choose_seconds: float


def _one_seed(dense: torch.nn.Module, loaders, setting: HeadChannelSetting, epochs: int,
              seed: int) -> SeedRun:
    """Search, slice and fine-tune once; the training data's order follows `seed` alone, not the runs
    before this one."""
    config = replace(digits_finetune_config(epochs), seed=seed)
    train = seeded_train_loader(loaders, seed)
    loaders = replace(loaders, train=train)
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}
    manager = PassManager(trace(dense), recipe=Recipe(base=base))
    gated = manager.run(HeadGatePass(HEAD_CHANNEL_VARIANTS[setting.variant].gate_mode))
    search = search_head_channels(gated, loaders.train, config, setting.budget, variant=setting.variant,
                                  calibration=loaders.train, teacher=dense, progress=False)
    searched = evaluate(gated, loaders.test).top1
    sliced = manager.run(HeadChannelSlicePass(setting.budget))
    oneshot = evaluate(sliced, loaders.test).top1
    tuned = finetune(sliced, loaders.train, loaders.val, config, teacher=dense, progress=False).model
    seconds = search.seconds + manager.recipe.passes[-1].stats["seconds"]
    return SeedRun(manager, tuned, searched, oneshot, evaluate(tuned, loaders.test).top1, seconds)


def _row(setting: HeadChannelSetting, runs: list[SeedRun], artifacts: Path) -> Row:
    """Mean top-1 of each stage over the seeds; shapes, MACs and the artifact are the first seed's (each
    seed selects its own channels, at the same budget)."""
    first = runs[0]
    row = make_row(METHOD, setting.settings(), first.tuned, statistics.fmean(r.finetuned for r in runs),
                   statistics.fmean(r.sliced for r in runs))
    row.top1_sparse_trained = statistics.fmean(r.searched for r in runs)
    row.top1_seeds = [r.finetuned for r in runs]
    row.prune_seconds = round(statistics.fmean(r.choose_seconds for r in runs), 3)
    variant = HEAD_CHANNEL_VARIANTS[setting.variant]
    row.calibration_samples = CALIBRATION_IMAGES if variant.similarity or variant.init else None
    export_row(first.tuned, first.manager.recipe, row, artifacts)
    return row


def head_channel_digits_rows(settings: tuple[HeadChannelSetting, ...], epochs: int, seeds: int,
                             artifacts: Path, progress: bool = True) -> list[Row]:
    """digits-vit at each setting: mean top-1 over `seeds` after the search, the slice and the fine-tune."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    def one_seed(setting, seed: int):
        return _one_seed(dense, loaders, setting, epochs, seed)

    results = over_seeds(settings, seeds, one_seed,
                         "digits-vit head-channels", progress)
    return [_row(setting, seed_runs, artifacts) for setting, seed_runs in results.items()]


def check_budgets_fit(model: torch.nn.Module, budgets: tuple[float, ...], multiple: int = DEFAULT_MULTIPLE
                      ) -> None:
    """PassError before any work when a budget would empty a head of `model` (shapes only, no data)."""
    if not budgets:
        return
    manager = PassManager(trace(model))
    gated = manager.run(HeadGatePass())
    for budget in budgets:
        choose_head_channels(gated, manager.structure, budget, multiple)


def head_channel_speed_graph(model: torch.nn.Module, budget: float, recipe: Recipe,
                             multiple: int = DEFAULT_MULTIPLE) -> PassManager:
    """The speed model with `budget` fewer attention MACs, its indicators from weight norms."""
    manager = PassManager(trace(model), recipe=recipe)
    gated = manager.run(HeadGatePass())
    indicators_from_weights(gated)
    manager.run(HeadChannelSlicePass(budget, multiple))
    return manager
