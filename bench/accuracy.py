"""What every digits-vit accuracy row shares: the row with its costs, the standard short fine-tune,
seeded data orders, runs over seeds, the exported artifact; and the dense row itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vitsparse.compiler import (
    ExportConfig,
    Recipe,
    attention_macs,
    count_costs,
    export_artifact,
    find_vit_structure,
    trace,
)
from vitsparse.models import evaluate
from vitsparse.pruners import FinetuneConfig

from .schema import Row
from .speed import artifact_slug

MODEL = "digits-vit"
CALIBRATION_IMAGES = 256  # training images the data-aware solvers see


def make_row(method: str, settings: dict, graph, top1: float, top1_oneshot: float | None,
             model: str = MODEL) -> Row:
    """A row (digits-vit unless `model` says) with the graph's MACs and parameters."""
    costs = count_costs(graph)
    return Row(
        model=model,
        method=method,
        settings=settings,
        top1=top1,
        top1_oneshot=top1_oneshot,
        macs=costs.macs,
        attention_macs=attention_macs(graph, find_vit_structure(graph), costs),
        params=costs.params,
        nonzero_params=costs.nonzero_params,
    )


def digits_finetune_config(epochs: int) -> FinetuneConfig:
    """The short fine-tune every digits-vit row gets (digits-vit is tiny: a higher lr, short warmup)."""
    return FinetuneConfig(epochs=epochs, lr=1e-3, warmup_steps=5)


def seeded_train_loader(loaders, seed: int) -> DataLoader:
    """The digits train split in an order drawn from `seed` alone: each seed's own data order."""
    return DataLoader(loaders.train.dataset, batch_size=loaders.train.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def over_seeds(settings: tuple, seeds: int, run: Callable[[Any, int], Any], desc: str,
               progress: bool = True, log: Callable[[str], None] | None = None) -> dict[Any, list]:
    """`run(setting, seed)` for every setting and seed 0..seeds−1, grouped by setting in order; a bar
    with `progress`, else a `log` line per seed (a seed can take a minute)."""
    results: dict[Any, list] = {}
    jobs = [(setting, seed) for setting in settings for seed in range(seeds)]
    for setting, seed in tqdm(jobs, desc=desc, unit="run", disable=not progress):
        started = time.perf_counter()
        results.setdefault(setting, []).append(run(setting, seed))
        if log is not None and not progress:
            log(f"      {desc}: seed {seed + 1}/{seeds} in {time.perf_counter() - started:.0f} s")
    return results


def export_row(graph, recipe: Recipe, row: Row, artifacts: Path) -> None:
    target = artifacts / artifact_slug(row)
    row.artifact = str(export_artifact(graph, recipe, target, ExportConfig(), overwrite=True).directory)


def dense_digits_row(ctx) -> Row:
    """The dense digits-vit row (every other row's reference), its artifact exported."""
    top1 = evaluate(ctx.dense, ctx.loaders.test).top1
    graph = trace(ctx.dense)
    row = make_row("dense", {}, graph, top1, top1, model=ctx.model)
    export_row(graph, Recipe(base=ctx.base), row, ctx.artifacts)
    return row
