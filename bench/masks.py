"""Mask rows, one spec per saliency (magnitude, layer-wise OBS, Fisher OBS): `magnitude=0.9`,
`obs-fisher=0.75@1x4`, `magnitude=2:4`.

digits-vit: the saliency's masks one-shot, then the standard short fine-tune (distilled from the dense
model, masks fixed). Speed model: the same masks on random weights; a data-aware saliency's row also
records how long choosing the masks took on calibration images (`prune_seconds`).
"""

from __future__ import annotations

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import evaluate
from vitsparse.pruners import finetune, make_calibration

from .accuracy import CALIBRATION_IMAGES, digits_finetune_config, export_row, make_row
from .methods import METHODS, SpeedSetting, parse_speed_setting
from .report import plot_accuracy, solver_table, sparsity_curves, sparsity_table
from .schema import Row
from .spec import DigitsContext, MethodSpec, SpeedContext
from .speed import SpeedCandidate


class MaskSpec(MethodSpec):
    """One saliency of the shared sparsity pass at a sparsity and pattern."""

    example = "0.75@1x4"
    summary = "SPARSITY[@1xK] or N:M"
    section = "masks"

    def __init__(self, name: str) -> None:
        self.name = name
        self.method = METHODS[name]

    def parse(self, text: str) -> SpeedSetting:
        try:
            return parse_speed_setting(text)
        except ValueError as err:
            raise self.bad_setting(text, str(err)) from None

    def digits_rows(self, setting: SpeedSetting, ctx: DigitsContext) -> list[Row]:
        calibration = make_calibration(ctx.loaders.train, CALIBRATION_IMAGES)
        manager = PassManager(trace(ctx.dense), recipe=Recipe(base=ctx.base))
        graph = manager.run(self.method.make_pass(setting.sparsity, setting.pattern, calibration,
                                                  samples=calibration.num_samples))
        oneshot = evaluate(graph, ctx.loaders.test).top1
        tuned = finetune(graph, ctx.loaders.train, ctx.loaders.val, digits_finetune_config(ctx.epochs),
                         teacher=ctx.dense, progress=False).model
        row = make_row(self.name, setting.settings(), tuned, evaluate(tuned, ctx.loaders.test).top1, oneshot,
                       model=ctx.model)
        _record_solver(row, manager)
        export_row(tuned, manager.recipe, row, ctx.artifacts)
        return [row]

    def speed_candidates(self, setting: SpeedSetting, ctx: SpeedContext) -> list[SpeedCandidate]:
        manager = PassManager(trace(ctx.model), recipe=Recipe(base=ctx.base))
        if self.method.needs_calibration:
            ctx.log(f"      choosing {self.name} masks on {ctx.calibration_samples} calibration images")
        manager.run(self.method.make_pass(setting.sparsity, setting.pattern, ctx.calibration,
                                          samples=ctx.calibration_samples))
        candidate = ctx.candidate(self.name, setting.settings(), manager)
        if self.method.needs_calibration:
            _record_solver(candidate.row, manager)
        return [candidate]

    def report_section(self, rows: list[Row], meta: dict) -> str:
        parts = []
        table = sparsity_table(rows)
        if table:
            parts.append("## Masks on digits-vit\n\nTop-1 on the held-out test split, one-shot (no "
                         "fine-tune) and after the standard short distilled fine-tune with the masks "
                         "fixed (unstructured rows; every row is in the accuracy table at the end).\n\n"
                         + table)
        solvers = solver_table(rows)
        if solvers:
            parts.append(f"## Solver time\n\nChoosing the masks once on the speed model, calibration: "
                         f"{meta.get('calibration', 'random images')}.\n\n" + solvers)
        return "\n\n".join(parts)

    def plots(self, rows: list[Row]) -> dict:
        return {"accuracy.png": lambda p: plot_accuracy(rows, p)} if sparsity_curves(rows, "top1") else {}


def _record_solver(row: Row, manager: PassManager) -> None:
    """How long choosing the masks took and on how many images."""
    row.prune_seconds = manager.recipe.passes[-1].stats["seconds"]
    row.calibration_samples = manager.recipe.passes[-1].stats.get("calibration_samples")


MAGNITUDE = MaskSpec("magnitude")
OBS_LAYERWISE = MaskSpec("obs-layerwise")
OBS_FISHER = MaskSpec("obs-fisher")
