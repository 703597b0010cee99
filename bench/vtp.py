"""VTP rows: dimension slicing on digits-vit (accuracy through its three stages) and on the speed model.

On digits-vit the scores are trained (task loss + λ·‖â‖₁, distilled from the dense model), the
model is sliced at each rate and fine-tuned; each stage's top-1 is recorded. The speed model has
random weights and nothing to train on, so its scores come from the data-free stand-in
`scores_from_weight_norms`: the timed shapes are what slicing at that rate yields, not a claim
about accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import (
    DimensionSlicePass,
    ScoreGatePass,
    finetune,
    scores_from_weight_norms,
    sparse_train,
)
from vitsparse.pruners.vtp import DEFAULT_L1, DEFAULT_MULTIPLE

from .accuracy import MODEL, digits_finetune_config, export_row, make_row

METHOD = "vtp"


@dataclass(frozen=True)
class VtpSetting:
    """A pruning rate and the multiple kept counts round to."""

    rate: float
    multiple: int = DEFAULT_MULTIPLE

    def settings(self) -> dict:
        return {"rate": self.rate, "multiple": self.multiple}


def vtp_digits_rows(
    rates: tuple[float, ...], epochs: int, artifacts: Path, l1: float = DEFAULT_L1, progress: bool = True
) -> list:
    """digits-vit at each rate: top-1 after sparse training, after slicing, after fine-tuning."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}
    rows = []
    for rate in tqdm(rates, desc="digits-vit vtp", unit="rate", disable=not progress):
        config = digits_finetune_config(epochs)
        manager = PassManager(trace(dense), recipe=Recipe(base=base))
        gated = manager.run(ScoreGatePass())
        sparse_train(gated, loaders.train, config, l1=l1, teacher=dense, progress=False)
        trained = evaluate(gated, loaders.test).top1
        sliced = manager.run(DimensionSlicePass(rate))
        oneshot = evaluate(sliced, loaders.test).top1
        tuned = finetune(sliced, loaders.train, loaders.val, config, teacher=dense, progress=False).model
        top1 = evaluate(tuned, loaders.test).top1
        row = make_row(METHOD, VtpSetting(rate).settings(), tuned, top1, oneshot)
        row.top1_sparse_trained = trained
        row.prune_seconds = manager.recipe.passes[-1].stats["seconds"]
        export_row(tuned, manager.recipe, row, artifacts)
        rows.append(row)
    return rows


def vtp_speed_graph(model: torch.nn.Module, setting: VtpSetting, recipe: Recipe) -> PassManager:
    """The speed model sliced at `setting`, its scores from the weight-norm stand-in."""
    manager = PassManager(trace(model), recipe=recipe)
    gated = manager.run(ScoreGatePass())
    scores_from_weight_norms(gated)
    manager.run(DimensionSlicePass(setting.rate, setting.multiple))
    return manager
