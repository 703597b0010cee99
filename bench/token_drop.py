"""Token-drop rows: fixed vs learned keep rates on digits-vit, static keep 0.7 timed on the speed model.

Each digits-vit setting aims at a FLOPs ratio (pruned MACs / dense MACs). `fixed` keeps the same share
of tokens at every stage, the share that reaches the ratio; `learned` trains one threshold per stage
jointly with the weights toward the ratio (AS-ViT), reads keep counts off them on calibration images,
then gets the same fine-tune as `fixed`. Every setting runs several seeds (a seed gives both modes the
same data order).

The fine-tune after dropping is longer than other rows' (`FINETUNE`): the recipe digits-vit was
trained with (lr 3e-3, pixel shifts) for 30 epochs. Dropping tokens of an 8×8 digit changes what
every later block sees, and the 4-epoch fine-tune left it 3 points below dense; without the shifts,
long fine-tunes overfit the 1257 training images.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import build_model, digits_loaders, evaluate, shifted_train_loader
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

from .accuracy import MODEL, digits_finetune_config, export_row, make_row, over_seeds, seeded_train_loader
from .schema import Row

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


def check_settings(settings: tuple[TokenDropSetting, ...]) -> None:
    """ValueError for a ratio outside (0, 1] or an unknown mode, before any work starts."""
    for setting in settings:
        if isinstance(setting.target_ratio, bool) or not 0 < setting.target_ratio <= 1:
            raise ValueError(f"token-drop FLOPs ratios must lie in (0, 1], got {setting.target_ratio!r}")
        if setting.mode not in MODES:
            raise ValueError(f"unknown token-drop mode {setting.mode!r}; choose from {', '.join(MODES)}")


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


def _one_seed(dense: torch.nn.Module, loaders, setting: TokenDropSetting, epochs: int, seed: int,
              finetune_epochs: int) -> SeedRun:
    """One seed: drop (learned thresholds train `epochs` with the weights), then the long fine-tune."""
    config = replace(digits_finetune_config(epochs), seed=seed)
    train = seeded_train_loader(loaders, seed)
    loaders = replace(loaders, train=train)
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}
    manager = PassManager(trace(copy.deepcopy(dense)), recipe=Recipe(base=base))
    depth = manager.structure.depth
    locations = check_locations(setting.locations or default_locations(depth), depth)
    if setting.mode == "learned":
        learned = _learned(manager, setting, locations, loaders, config, dense)
    else:
        learned = None
        _fixed(manager, setting, locations)
    static = evaluate(manager.graph_module, loaders.test).top1
    tune_config = replace(FINETUNE, epochs=finetune_epochs, seed=seed)
    tuned = finetune(manager.graph_module, shifted_train_loader(loaders, seed), loaders.val, tune_config,
                     teacher=dense, progress=False).model
    record = manager.recipe.passes[-1]
    seconds = record.stats["seconds"] + record.stats.get("learn_seconds", 0.0)
    return SeedRun(manager, tuned, learned, static, evaluate(tuned, loaders.test).top1, seconds)


def _row(setting: TokenDropSetting, runs: list[SeedRun], artifacts: Path) -> Row:
    """Means over the seeds; MACs, keep counts and the artifact are the first seed's."""
    first = runs[0]
    record = first.manager.recipe.passes[-1]
    settings = {"mode": setting.mode, "target_ratio": setting.target_ratio,
                "keep_rate": record.params["keep_rate"], "locations": record.params["locations"],
                "kept_tokens": record.decisions["kept_tokens"]}
    row = make_row(METHOD, settings, first.tuned, statistics.fmean(r.finetuned for r in runs),
                   statistics.fmean(r.static for r in runs))
    if setting.mode == "learned":
        row.top1_sparse_trained = statistics.fmean(r.learned for r in runs)
        row.calibration_samples = CALIBRATION_IMAGES
    row.top1_seeds = [r.finetuned for r in runs]
    row.prune_seconds = round(statistics.fmean(r.seconds for r in runs), 3)
    export_row(first.tuned, first.manager.recipe, row, artifacts)
    return row


def token_drop_digits_rows(settings: tuple[TokenDropSetting, ...], epochs: int, seeds: int, artifacts: Path,
                           progress: bool = True, finetune_epochs: int = FINETUNE_EPOCHS) -> list[Row]:
    """digits-vit at each setting: top-1 of the static model before and after fine-tuning, over seeds
    (thresholds learn for `epochs`, the fine-tune after dropping runs `finetune_epochs`)."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    def one_seed(setting, seed: int):
        return _one_seed(dense, loaders, setting, epochs, seed, finetune_epochs)

    results = over_seeds(settings, seeds, one_seed,
                         "digits-vit token-drop", progress)
    return [_row(setting, seed_runs, artifacts) for setting, seed_runs in results.items()]


def token_drop_speed_graph(model: torch.nn.Module, keep_rate: float, recipe: Recipe) -> PassManager:
    """The speed model with static selection keeping `keep_rate` at the default stages."""
    manager = PassManager(trace(model), recipe=recipe)
    manager.run(TokenDropPass(keep_rate))
    return manager


def speed_settings(manager: PassManager) -> dict:
    record = manager.recipe.passes[-1]
    return {"mode": record.params["mode"], "keep_rate": record.params["keep_rate"],
            "locations": record.params["locations"], "kept_tokens": record.decisions["kept_tokens"]}
