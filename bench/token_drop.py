"""Token-drop rows: a static keep rate timed on the speed model; digits-vit, with fixed or learned keep
rates, aims at the FLOPs ratio (pruned MACs / dense MACs) that keep rate gives it.

On digits-vit `fixed` keeps the same share of tokens at every stage, the share that reaches the ratio;
`learned` trains one threshold per stage jointly with the weights toward the ratio (AS-ViT), reads keep
counts off them on calibration images, then gets the same fine-tune as `fixed`. Every setting runs
several seeds (a seed gives both modes the same data order).

The fine-tune after dropping is longer than other rows' (`FINETUNE`): the recipe digits-vit was
trained with (lr 3e-3, pixel shifts) for 30 epochs. Dropping tokens of an 8×8 digit changes what
every later block sees, and the 4-epoch fine-tune left it 3 points below dense; without the shifts,
long fine-tunes overfit the 1257 training images.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, replace

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import evaluate, shifted_train_loader
from vitsparse.pruners import (
    FinetuneConfig,
    ThresholdConfig,
    TokenDropPass,
    finetune,
    learn_thresholds,
    make_calibration,
)
from vitsparse.pruners.token_drop import check_locations, default_locations
from vitsparse.pruners.token_thresholds import gated_copy, keep_rate_for_ratio, token_costs

from .accuracy import digits_finetune_config, export_row, make_row, over_seeds, seeded_train_loader
from .int8 import with_digits_twin, with_speed_twins
from .report import token_drop_table
from .schema import Row
from .spec import DigitsContext, MethodSpec, SpeedContext, parse_fraction, split_choice
from .speed import SPEED_MODEL_ATOL, SpeedCandidate

METHOD = "token-drop"
MODES = ("fixed", "learned")
CALIBRATION_IMAGES = 256  # training images the learned thresholds are read on
FINETUNE_EPOCHS = 30
FINETUNE = FinetuneConfig(epochs=FINETUNE_EPOCHS, lr=3e-3, warmup_steps=5)  # shifted images (above)


@dataclass(frozen=True)
class TokenDropSetting:
    """A FLOPs ratio to reach, how (fixed or learned keep rate), and the stages (None: the default)."""

    target_ratio: float
    mode: str = "fixed"
    locations: tuple[int, ...] | None = None


@dataclass
class SeedRun:
    manager: PassManager
    tuned: torch.nn.Module
    learned: float | None  # learned: the adaptive (per-image threshold) model before the static counts
    static: float
    finetuned: float
    seconds: float


def _fixed(manager: PassManager, setting: TokenDropSetting, locations: tuple[int, ...]) -> None:
    """The keep rate that, at every stage, reaches the setting's FLOPs ratio."""
    structure = manager.structure
    costs = token_costs(manager.graph_module, structure)
    rate = keep_rate_for_ratio(costs, locations, structure.num_prefix_tokens, setting.target_ratio)
    manager.run(TokenDropPass(round(rate, 4), locations))


def _learned(manager: PassManager, setting: TokenDropSetting, locations: tuple[int, ...], loaders, config,
             dense) -> float:
    """Thresholds trained with the weights; returns the adaptive top-1 before the static counts."""
    calibration = torch.cat([x for x, _ in make_calibration(loaders.train, CALIBRATION_IMAGES)])
    learned = learn_thresholds(manager.graph_module, loaders.train,
                               ThresholdConfig(setting.target_ratio, locations), config, calibration,
                               teacher=dense, progress=False)
    adaptive = evaluate(gated_copy(manager.graph_module, locations, learned.thresholds).eval(), loaders.test)
    manager.run(TokenDropPass(thresholds=learned.thresholds, locations=locations, calibration=calibration))
    manager.recipe.passes[-1].stats["learn_seconds"] = learned.seconds
    return adaptive.top1


def _one_seed(ctx: DigitsContext, setting: TokenDropSetting, seed: int) -> SeedRun:
    """One seed: drop (learned thresholds train the standard epochs with the weights), then the long
    fine-tune."""
    config = replace(digits_finetune_config(ctx.epochs), seed=seed)
    dense, loaders = ctx.dense, replace(ctx.loaders, train=seeded_train_loader(ctx.loaders, seed))
    manager = PassManager(trace(copy.deepcopy(dense)), recipe=Recipe(base=ctx.base))
    depth = manager.structure.depth
    locations = check_locations(setting.locations or default_locations(depth), depth)
    if setting.mode == "learned":
        learned = _learned(manager, setting, locations, loaders, config, dense)
    else:
        learned = None
        _fixed(manager, setting, locations)
    static = evaluate(manager.graph_module, loaders.test).top1
    tune_config = replace(FINETUNE, epochs=ctx.long_epochs or FINETUNE_EPOCHS, seed=seed)
    tuned = finetune(manager.graph_module, shifted_train_loader(loaders, seed), loaders.val, tune_config,
                     teacher=dense, progress=False).model
    record = manager.recipe.passes[-1]
    seconds = record.stats["seconds"] + record.stats.get("learn_seconds", 0.0)
    return SeedRun(manager, tuned, learned, static, evaluate(tuned, loaders.test).top1, seconds)


def _row(setting: TokenDropSetting, runs: list[SeedRun], ctx: DigitsContext) -> Row:
    """Means over the seeds; MACs, keep counts and the artifact are the first seed's."""
    first = runs[0]
    record = first.manager.recipe.passes[-1]
    settings = {"mode": setting.mode, "target_ratio": setting.target_ratio,
                "keep_rate": record.params["keep_rate"], "locations": record.params["locations"],
                "kept_tokens": record.decisions["kept_tokens"]}
    row = make_row(METHOD, settings, first.tuned, statistics.fmean(r.finetuned for r in runs),
                   statistics.fmean(r.static for r in runs), model=ctx.model)
    if setting.mode == "learned":
        row.top1_sparse_trained = statistics.fmean(r.learned for r in runs)
        row.calibration_samples = CALIBRATION_IMAGES
    row.top1_seeds = [r.finetuned for r in runs]
    row.prune_seconds = round(statistics.fmean(r.seconds for r in runs), 3)
    export_row(first.tuned, first.manager.recipe, row, ctx.artifacts)
    return row


def token_drop_speed_graph(model: torch.nn.Module, keep_rate: float, recipe: Recipe) -> PassManager:
    """The speed model with static selection keeping `keep_rate` at the default stages."""
    manager = PassManager(trace(model), recipe=recipe)
    manager.run(TokenDropPass(keep_rate))
    return manager


def speed_settings(manager: PassManager) -> dict:
    record = manager.recipe.passes[-1]
    return {"mode": record.params["mode"], "keep_rate": record.params["keep_rate"],
            "locations": record.params["locations"], "kept_tokens": record.decisions["kept_tokens"]}


SEEDS = 2  # seeds per digits-vit row


@dataclass(frozen=True)
class TokenSetting:
    """A static keep rate (timed on the speed model) and how digits-vit reaches the FLOPs it gives."""

    keep_rate: float
    mode: str = "learned"
    int8: bool = False


def flops_ratio(model: torch.nn.Module, keep_rate: float) -> float:
    """MACs after static dropping at `keep_rate` (default stages) over the model's dense MACs."""
    manager = PassManager(trace(copy.deepcopy(model)))
    dense_macs = manager.costs.macs
    manager.run(TokenDropPass(keep_rate))
    return round(manager.costs.macs / dense_macs, 4)


class TokenDropSpec(MethodSpec):
    name = "tokens"
    example = "0.7"
    summary = "KEEP_RATE[:learned|fixed][+int8]"

    def parse(self, text: str) -> TokenSetting:
        keep, mode, int8 = split_choice(self, text, MODES, "learned")
        keep_rate = parse_fraction(self, keep, high_included=True)
        if keep_rate == 0:
            raise self.bad_setting(text, "a keep rate of 0 drops every token")
        return TokenSetting(keep_rate, mode, int8)

    def digits_rows(self, setting: TokenSetting, ctx: DigitsContext) -> list[Row]:
        """digits-vit aiming at the FLOPs ratio the keep rate gives it, over seeds: top-1 of the static
        model before and after the long fine-tune."""
        target = TokenDropSetting(flops_ratio(ctx.dense, setting.keep_rate), setting.mode)
        runs = over_seeds((target,), ctx.seeds_or(SEEDS), lambda s, seed: _one_seed(ctx, s, seed),
                          f"{ctx.model} tokens {setting.keep_rate:g} {setting.mode}", ctx.progress,
                          ctx.log)[target]
        return with_digits_twin(_row(target, runs, ctx), setting.int8, ctx)

    def speed_candidates(self, setting: TokenSetting, ctx: SpeedContext) -> list[SpeedCandidate]:
        manager = token_drop_speed_graph(ctx.model, setting.keep_rate, Recipe(base=ctx.base))
        candidate = ctx.candidate(METHOD, speed_settings(manager), manager, export={"atol": SPEED_MODEL_ATOL})
        return with_speed_twins(candidate, setting.int8, ctx)

    def report_section(self, rows: list[Row], meta: dict) -> str:
        table = token_drop_table(rows)
        return (
            "## Token dropping (AS-ViT)\n\nTokens scored by the class token's attention weighted by each "
            "head's output norm, dropped before the listed blocks (0-based). A setting is the static keep "
            "rate timed on the speed model; digits-vit aims at the FLOPs ratio (MACs after / dense) that "
            "rate gives it: `fixed` keeps the same share at every stage, `learned` trains one threshold "
            "per stage with the weights (cross-entropy + 2.0·|FLOPs ratio − target| + distillation), then "
            "keeps each stage's mean count on calibration images. Top-1 adaptive is the learned thresholds "
            "applied image by image before the counts are fixed; static is the exported form (TopK + "
            "Gather) before fine-tuning; fine-tuned (digits-vit's own training recipe: lr 3e-3, pixel "
            "shifts) is the mean ± its standard error over the seeds. Kept tokens and MACs are the first "
            "seed's.\n\n" + table) if table else ""


SPEC = TokenDropSpec()
