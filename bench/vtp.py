"""VTP rows: dimension slicing on digits-vit (accuracy through its three stages) and on the speed model.

On digits-vit the scores are trained (task loss + λ·‖â‖₁, distilled from the dense model), the
model is sliced at each rate and fine-tuned; each stage's top-1 is recorded. The speed model has
random weights and nothing to train on, so its scores come from the data-free stand-in
`scores_from_weight_norms`: the timed shapes are what slicing at that rate yields, not a claim
about accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import evaluate
from vitsparse.pruners import (
    DimensionSlicePass,
    ScoreGatePass,
    finetune,
    scores_from_weight_norms,
    sparse_train,
)
from vitsparse.pruners.vtp import DEFAULT_L1, DEFAULT_MULTIPLE

from .accuracy import digits_finetune_config, export_row, make_row
from .int8 import with_digits_twin, with_speed_twins
from .report import vtp_table
from .schema import Row
from .spec import DigitsContext, MethodSpec, SpeedContext, parse_fraction, split_int8
from .speed import SpeedCandidate

METHOD = "vtp"


@dataclass(frozen=True)
class VtpSetting:
    """A pruning rate, the multiple kept counts round to, and whether the INT8 twin runs too."""

    rate: float
    multiple: int = DEFAULT_MULTIPLE
    int8: bool = False

    def settings(self) -> dict:
        return {"rate": self.rate, "multiple": self.multiple}


def vtp_digits_row(setting: VtpSetting, ctx: DigitsContext, l1: float = DEFAULT_L1) -> Row:
    """digits-vit at `setting`: top-1 after sparse training, after slicing, after fine-tuning."""
    dense, loaders = ctx.dense, ctx.loaders
    config = digits_finetune_config(ctx.epochs)
    manager = PassManager(trace(dense), recipe=Recipe(base=ctx.base))
    gated = manager.run(ScoreGatePass())
    sparse_train(gated, loaders.train, config, l1=l1, teacher=dense, progress=False)
    trained = evaluate(gated, loaders.test).top1
    sliced = manager.run(DimensionSlicePass(setting.rate, setting.multiple))
    oneshot = evaluate(sliced, loaders.test).top1
    tuned = finetune(sliced, loaders.train, loaders.val, config, teacher=dense, progress=False).model
    row = make_row(METHOD, setting.settings(), tuned, evaluate(tuned, loaders.test).top1, oneshot,
                   model=ctx.model)
    row.top1_sparse_trained = trained
    row.prune_seconds = manager.recipe.passes[-1].stats["seconds"]
    export_row(tuned, manager.recipe, row, ctx.artifacts)
    return row


def vtp_speed_graph(model: torch.nn.Module, setting: VtpSetting, recipe: Recipe) -> PassManager:
    """The speed model sliced at `setting`, its scores from the weight-norm stand-in."""
    manager = PassManager(trace(model), recipe=recipe)
    gated = manager.run(ScoreGatePass())
    scores_from_weight_norms(gated)
    manager.run(DimensionSlicePass(setting.rate, setting.multiple))
    return manager


class VtpSpec(MethodSpec):
    name = METHOD
    example = "0.4"
    summary = "RATE[:MULTIPLE][+int8]"

    def parse(self, text: str) -> VtpSetting:
        body, int8 = split_int8(text)
        rate, _, multiple = body.partition(":")
        if multiple and not multiple.isdigit():
            raise self.bad_setting(text, "the multiple is a whole number")
        return VtpSetting(parse_fraction(self, rate), int(multiple or DEFAULT_MULTIPLE), int8)

    def digits_rows(self, setting: VtpSetting, ctx: DigitsContext) -> list[Row]:
        return with_digits_twin(vtp_digits_row(setting, ctx), setting.int8, ctx)

    def speed_candidates(self, setting: VtpSetting, ctx: SpeedContext) -> list[SpeedCandidate]:
        manager = vtp_speed_graph(ctx.model, setting, Recipe(base=ctx.base))
        return with_speed_twins(ctx.candidate(METHOD, setting.settings(), manager), setting.int8, ctx)

    def report_section(self, rows: list[Row], meta: dict) -> str:
        table = vtp_table(rows)
        return ("## Dimension slicing (VTP)\n\nScores trained with λ·‖â‖₁ on digits-vit, then sliced at the "
                "rate and fine-tuned. The speed model's scores come from weight norms (random weights, "
                "nothing to train): its rows measure the sliced shapes.\n\n" + table) if table else ""


SPEC = VtpSpec()
