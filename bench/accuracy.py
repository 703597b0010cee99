"""Accuracy rows on the built-in digits-vit: dense, then each method one-shot and after fine-tuning."""

from __future__ import annotations

from pathlib import Path

from vitsparse.compiler import ExportConfig, PassManager, Recipe, count_costs, export_artifact, trace
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import FinetuneConfig, MagnitudePass, finetune

from .schema import Row

MODEL = "digits-vit"


def _row(method: str, settings: dict, graph, top1: float, top1_oneshot: float) -> Row:
    costs = count_costs(graph)
    return Row(
        model=MODEL,
        method=method,
        settings=settings,
        top1=top1,
        top1_oneshot=top1_oneshot,
        macs=costs.macs,
        params=costs.params,
        nonzero_params=costs.nonzero_params,
    )


def _export(graph, recipe: Recipe, row: Row, artifacts: Path) -> None:
    settings = "-".join(str(v) for v in row.settings.values())
    target = artifacts / "-".join(p for p in (MODEL, row.method, settings) if p)
    row.artifact = str(export_artifact(graph, recipe, target, ExportConfig(), overwrite=True).directory)


def digits_rows(
    sparsities: tuple[float, ...], finetune_epochs: int, artifacts: Path, progress: bool = True
) -> list[Row]:
    """Dense digits-vit, then magnitude masks at each sparsity: top-1 one-shot and fine-tuned."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}
    dense_top1 = evaluate(dense, loaders.test).top1
    dense_graph = trace(dense)
    rows = [_row("dense", {}, dense_graph, dense_top1, dense_top1)]
    _export(dense_graph, Recipe(base=base), rows[0], artifacts)
    for sparsity in sparsities:
        manager = PassManager(trace(dense), recipe=Recipe(base=base))
        graph = manager.run(MagnitudePass(sparsity=sparsity))
        oneshot = evaluate(graph, loaders.test).top1
        config = FinetuneConfig(epochs=finetune_epochs, lr=1e-3, warmup_steps=5)  # digits-vit is tiny
        tuned = finetune(graph, loaders.train, loaders.val, config, teacher=dense, progress=progress).model
        row = _row("magnitude", {"sparsity": sparsity}, tuned, evaluate(tuned, loaders.test).top1, oneshot)
        _export(tuned, manager.recipe, row, artifacts)
        rows.append(row)
    return rows
