"""Accuracy rows on the built-in digits-vit: dense, then each method at each sparsity, one-shot and
after the standard short fine-tune (distilled from the dense model, masks fixed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vitsparse.compiler import (
    ExportConfig,
    PassManager,
    Recipe,
    attention_macs,
    count_costs,
    export_artifact,
    find_vit_structure,
    trace,
)
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import FinetuneConfig, finetune, make_calibration

from .methods import METHODS
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
               progress: bool = True) -> dict[Any, list]:
    """`run(setting, seed)` for every setting and seed 0..seeds−1, grouped by setting in order."""
    results: dict[Any, list] = {}
    jobs = [(setting, seed) for setting in settings for seed in range(seeds)]
    for setting, seed in tqdm(jobs, desc=desc, unit="run", disable=not progress):
        results.setdefault(setting, []).append(run(setting, seed))
    return results


def export_row(graph, recipe: Recipe, row: Row, artifacts: Path) -> None:
    target = artifacts / artifact_slug(row)
    row.artifact = str(export_artifact(graph, recipe, target, ExportConfig(), overwrite=True).directory)


def digits_rows(
    methods: tuple[str, ...],
    sparsities: tuple[float, ...],
    finetune_epochs: int,
    artifacts: Path,
    progress: bool = True,
) -> list[Row]:
    """Dense digits-vit, then every method at every sparsity (unstructured): top-1 one-shot and fine-tuned."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    calibration = make_calibration(loaders.train, CALIBRATION_IMAGES)
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}
    dense_top1 = evaluate(dense, loaders.test).top1
    dense_graph = trace(dense)
    rows = [make_row("dense", {}, dense_graph, dense_top1, dense_top1)]
    export_row(dense_graph, Recipe(base=base), rows[0], artifacts)
    runs = [(m, s) for m in methods for s in sparsities]
    for method, sparsity in tqdm(runs, desc="digits-vit methods", unit="setting", disable=not progress):
        manager = PassManager(trace(dense), recipe=Recipe(base=base))
        graph = manager.run(
            METHODS[method].make_pass(sparsity, calibration=calibration, samples=CALIBRATION_IMAGES)
        )
        oneshot = evaluate(graph, loaders.test).top1
        config = digits_finetune_config(finetune_epochs)
        tuned = finetune(graph, loaders.train, loaders.val, config, teacher=dense, progress=False).model
        settings = {"sparsity": sparsity, "pattern": "unstructured"}
        row = make_row(method, settings, tuned, evaluate(tuned, loaders.test).top1, oneshot)
        row.prune_seconds = manager.recipe.passes[-1].stats["seconds"]
        row.calibration_samples = manager.recipe.passes[-1].stats.get("calibration_samples")
        export_row(tuned, manager.recipe, row, artifacts)
        rows.append(row)
    return rows
