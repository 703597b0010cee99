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

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import evaluate
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

from .accuracy import digits_finetune_config, export_row, make_row, over_seeds, seeded_train_loader
from .int8 import with_digits_twin, with_speed_twins
from .report import head_channel_rows, head_channel_table, plot_head_channels
from .schema import Row
from .spec import DigitsContext, MethodSpec, SpeedContext, parse_fraction, split_choice
from .speed import SpeedCandidate

METHOD = "head-channels"


@dataclass(frozen=True)
class HeadChannelSetting:
    """A budget (fraction of attention MACs removed) and the variant of the method."""

    budget: float
    variant: str = "full"
    int8: bool = False  # the INT8 twin too

    def settings(self) -> dict:
        return {"budget": self.budget, "variant": self.variant}


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


def _one_seed(ctx: DigitsContext, setting: HeadChannelSetting, seed: int) -> SeedRun:
    """Search, slice and fine-tune once; the training data's order follows `seed` alone, not the runs
    before this one."""
    config = replace(digits_finetune_config(ctx.epochs), seed=seed)
    dense, loaders = ctx.dense, replace(ctx.loaders, train=seeded_train_loader(ctx.loaders, seed))
    manager = PassManager(trace(dense), recipe=Recipe(base=ctx.base))
    gated = manager.run(HeadGatePass(HEAD_CHANNEL_VARIANTS[setting.variant].gate_mode))
    search = search_head_channels(gated, loaders.train, config, setting.budget, variant=setting.variant,
                                  calibration=loaders.train, teacher=dense, progress=False)
    searched = evaluate(gated, loaders.test).top1
    sliced = manager.run(HeadChannelSlicePass(setting.budget))
    oneshot = evaluate(sliced, loaders.test).top1
    tuned = finetune(sliced, loaders.train, loaders.val, config, teacher=dense, progress=False).model
    seconds = search.seconds + manager.recipe.passes[-1].stats["seconds"]
    return SeedRun(manager, tuned, searched, oneshot, evaluate(tuned, loaders.test).top1, seconds)


def _row(setting: HeadChannelSetting, runs: list[SeedRun], ctx: DigitsContext) -> Row:
    """Mean top-1 of each stage over the seeds; shapes, MACs and the artifact are the first seed's (each
    seed selects its own channels, at the same budget)."""
    first = runs[0]
    row = make_row(METHOD, setting.settings(), first.tuned, statistics.fmean(r.finetuned for r in runs),
                   statistics.fmean(r.sliced for r in runs), model=ctx.model)
    row.top1_sparse_trained = statistics.fmean(r.searched for r in runs)
    row.top1_seeds = [r.finetuned for r in runs]
    row.prune_seconds = round(statistics.fmean(r.choose_seconds for r in runs), 3)
    variant = HEAD_CHANNEL_VARIANTS[setting.variant]
    row.calibration_samples = CALIBRATION_IMAGES if variant.similarity or variant.init else None
    export_row(first.tuned, first.manager.recipe, row, ctx.artifacts)
    return row


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


SEEDS = 3  # seeds per digits-vit row: fine-tuned top-1 moves by about ±0.4 pt from seed to seed


class HeadChannelSpec(MethodSpec):
    name = "heads"
    example = "0.3:full"
    summary = "BUDGET[:VARIANT][+int8]"

    def parse(self, text: str) -> HeadChannelSetting:
        budget, variant, int8 = split_choice(self, text, HEAD_CHANNEL_VARIANTS, "full")
        return HeadChannelSetting(parse_fraction(self, budget), variant, int8)

    def digits_rows(self, setting: HeadChannelSetting, ctx: DigitsContext) -> list[Row]:
        """Mean top-1 over the seeds after the search, the slice and the fine-tune."""
        check_budgets_fit(ctx.dense, (setting.budget,))
        runs = over_seeds((setting,), ctx.seeds_or(SEEDS), lambda s, seed: _one_seed(ctx, s, seed),
                          f"{ctx.model} heads {setting.budget:g} {setting.variant}", ctx.progress,
                          ctx.log)[setting]
        return with_digits_twin(_row(setting, runs, ctx), setting.int8, ctx)

    def check(self, setting: HeadChannelSetting, model: torch.nn.Module) -> None:
        check_budgets_fit(model, (setting.budget,))

    def speed_candidates(self, setting: HeadChannelSetting, ctx: SpeedContext) -> list[SpeedCandidate]:
        manager = head_channel_speed_graph(ctx.model, setting.budget, Recipe(base=ctx.base))
        settings = {"budget": setting.budget, "multiple": manager.recipe.passes[-1].params["multiple"]}
        return with_speed_twins(ctx.candidate(METHOD, settings, manager), setting.int8, ctx)

    def report_section(self, rows: list[Row], meta: dict) -> str:
        table = head_channel_table(rows)
        return (
            "## Head-equal channel removal\n\nThe same q/k and v channel counts removed from every head at a "
            "budget of fewer attention MACs (qkv, attention matmuls, proj), then fine-tuned; each row is the "
            "mean over its seeds. Variants: `full` (similarity-weighted indicators initialised from the "
            "attention difference, trained toward the budget, with reweighting), `l1` (a plain L1-trained "
            "indicator), and `full` without one of its parts. The speed model's indicators come from "
            "weight norms (random weights): its rows measure the sliced shapes. Top-1 searched is the "
            "gated model with its keep masks at the final selection; MACs and the artifact are the first "
            "seed's. Fine-tuned top-1 is the mean ± its standard error over the seeds; `vs l1, paired` is "
            "the fine-tuned difference to the `l1` row seed by seed (a seed gives every variant the same "
            "data order), mean ± standard error.\n\n" + table) if table else ""

    def plots(self, rows: list[Row]) -> dict:
        return {"head_channels.png": lambda p: plot_head_channels(rows, p)} if head_channel_rows(rows) else {}


SPEC = HeadChannelSpec()
