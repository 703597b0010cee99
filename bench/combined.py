"""The combined recipes: every method that has landed, applied to one model in turn.

Dimension slicing (VTP), head-equal channel removal, token dropping and unstructured masks compose as
passes of one recipe: shapes shrink first, then the sequence, then the weights turn to zeros; with
`int8`, static INT8 ends it. On digits-vit the recipe trains stage by stage (`staged.py`: each pass
recovers before the next, distilled from the dense model, over several seeds). The speed model, with
random weights, gets every choice from weight norms (static keep counts, magnitude masks): its rows
measure the shapes and zeros the recipe yields. The full profile's
frontier is recipe files from light to heavy (`recipes/frontier/`).
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.pruners import (
    DEFAULT_TARGETS,
    DimensionSlicePass,
    HeadChannelSlicePass,
    HeadGatePass,
    QuantConfig,
    ScoreGatePass,
    SparsityPass,
    TokenDropPass,
    indicators_from_weights,
    make_calibration,
    scores_from_weight_norms,
)
from vitsparse.pruners.token_drop import scale_locations

from .accuracy import CALIBRATION_IMAGES, export_row, make_row, over_seeds, seeded_train_loader
from .frontier import frontier_table
from .int8 import OBSERVER as INT8_OBSERVER
from .int8 import verify_formats, with_speed_twins
from .labels import combined_setting_label
from .plan import RECIPES_DIR, RecipePlan, load_plan
from .report import combined_table
from .schema import Row
from .spec import DigitsContext, MethodSpec, SpeedContext, split_int8
from .speed import SPEED_MODEL_ATOL, SpeedCandidate, artifact_slug
from .staged import MASK_SALIENCY, MASK_SOLVER, StagedRun, StagedSchedule, run_staged
from .stages import Finetune

METHOD = "combined"


@dataclass(frozen=True)
class CombinedSetting:
    """Each pass's setting; a pass set to 0 (or keep 1) is left out of the recipe."""

    vtp_rate: float = 0.2
    head_budget: float = 0.3
    keep_rate: float = 0.7
    sparsity: float = 0.8
    # sliced widths round to 16: DeepSparse 1.8's sparse kernels give wrong results on masked weights
    # whose input width is not a multiple of 16 (the runtime refuses such a file)
    multiple: int = 16
    int8: bool = False  # static INT8 last (calibrated; on digits-vit fine-tuned quantization-aware)
    # where tokens drop, as blocks of a 12-block model (scaled to the model's depth); None: AS-ViT's
    # (4, 7, 10). Earlier stages cut more: the blocks before the first drop see every token
    token_locations: tuple[int, ...] | None = None
    fuse_tokens: bool = False  # dropped tokens averaged into one (EViT) instead of lost
    int8_patch_embed: bool = False  # INT8 also covers the patch embedding (a ConvInteger on DeepSparse)
    # the masks' pattern and scope: unstructured and global suit DeepSparse; 1x4 blocks in every layer
    # (scope "layer") are what vitsparse's own kernels (openvino-sparse) run
    mask_pattern: str = "unstructured"
    mask_scope: str = "global"

    def passes(self) -> list[str]:
        chosen = [("vtp", self.vtp_rate > 0), ("head-channels", self.head_budget > 0),
                  ("token-drop", self.keep_rate < 1), ("magnitude", self.sparsity > 0), ("int8", self.int8)]
        return [name for name, included in chosen if included]

    def settings(self) -> dict:
        settings = {"passes": self.passes(), "vtp_rate": self.vtp_rate, "head_budget": self.head_budget,
                    "keep_rate": self.keep_rate, "sparsity": self.sparsity, "multiple": self.multiple}
        if self.token_locations is not None:
            settings["token_locations"] = list(self.token_locations)
        if self.fuse_tokens:
            settings["fuse_tokens"] = True
        if self.int8 and self.int8_patch_embed:
            settings["int8_patch_embed"] = True
        if (self.mask_pattern, self.mask_scope) != ("unstructured", "global"):
            settings.update(mask_pattern=self.mask_pattern, mask_scope=self.mask_scope)
        return settings

    def quant_config(self) -> QuantConfig:
        """The INT8 pass's layers and observer."""
        targets = DEFAULT_TARGETS + (("patch_embed",) if self.int8_patch_embed else ())
        return QuantConfig(targets=targets, observer=INT8_OBSERVER)

    def token_drop_pass(self, depth: int) -> TokenDropPass:
        """Static token dropping at this setting's locations, scaled to a `depth`-block model."""
        locations = None if self.token_locations is None else scale_locations(self.token_locations, depth)
        return TokenDropPass(self.keep_rate, locations, fuse=self.fuse_tokens)


def from_plan(plan: RecipePlan) -> tuple[CombinedSetting, StagedSchedule]:
    """The setting and staged schedule a combined recipe file describes: slicing (scores trained, then a
    recovery fine-tune), head channels (indicators from weights), learned token thresholds, gradual
    Fisher OBS masks, INT8 with quantization-aware training, each optional but in that shape."""
    stages = [s.stage for s in plan.stages]
    found: dict[str, Any] = {"vtp_rate": 0.0, "head_budget": 0.0, "keep_rate": 1.0, "sparsity": 0.0}  # off
    for index, stage in enumerate(stages):
        following = stages[index + 1] if index + 1 < len(stages) else None
        after = following.epochs if isinstance(following, Finetune) else None
        reader = _PLAN_READERS.get(stage.kind)
        if reader is not None:
            reader(stage, after, found)
        elif stage.kind not in ("finetune", "head-search", "token-thresholds"):
            raise ValueError(f"{plan.source}: the combined rows do not run a {stage.kind} stage")
    multiples = set(found.pop("multiples", [16]))
    if len(multiples) != 1:
        raise ValueError(f"{plan.source}: the combined rows slice to one multiple, got {sorted(multiples)}")
    schedule = StagedSchedule(**{k: found.pop(k) for k in list(found) if k in _SCHEDULE_KEYS})
    return CombinedSetting(**found, multiple=multiples.pop()), schedule


_SCHEDULE_KEYS = {f.name for f in fields(StagedSchedule)}


def _read_vtp(stage, after, found) -> None:
    found.update(vtp_rate=stage.rate, recover_epochs=after)
    found.setdefault("multiples", []).append(stage.multiple)


def _read_head(stage, after, found) -> None:
    found.update(head_budget=stage.budget, recover_epochs=after)
    found.setdefault("multiples", []).append(stage.multiple)


def _read_scores(stage, after, found) -> None:
    found.update(score_epochs=stage.epochs, lr=stage.lr)


def _read_tokens(stage, after, found) -> None:
    if stage.keep_rate is None:
        raise ValueError("the combined rows drop tokens at a static keep_rate: give token-drop a "
                         f"keep_rate instead of flops_ratio {stage.flops_ratio} (the ratio alone is for "
                         "`vitsparse prune`)")
    found.update(keep_rate=stage.keep_rate, token_epochs=after, fuse_tokens=stage.fuse,
                 token_locations=stage.locations)


def _read_thresholds(stage, after, found) -> None:
    found.update(threshold_epochs=stage.epochs)


def _read_masks(stage, after, found) -> None:
    if (stage.saliency, stage.solver) != (MASK_SALIENCY, MASK_SOLVER):
        raise ValueError(f"the combined rows' masks are {MASK_SALIENCY} with solver {MASK_SOLVER}")
    found.update(sparsity=stage.sparsity, mask_steps=stage.steps, mask_recover_epochs=stage.epochs,
                 mask_epochs=after, mask_pattern=stage.pattern, mask_scope=stage.scope)


def _read_int8(stage, after, found) -> None:
    found.update(int8=True, int8_patch_embed=stage.patch_embed)


def _read_qat(stage, after, found) -> None:
    found.update(qat_epochs=stage.epochs)


_PLAN_READERS = {"vtp-slice": _read_vtp, "head-channel-slice": _read_head, "vtp-scores": _read_scores,
                 "token-drop": _read_tokens, "token-thresholds": _read_thresholds, "sparsity": _read_masks,
                 "int8": _read_int8, "qat": _read_qat}


def shipped_combined(name: str) -> tuple[CombinedSetting, StagedSchedule]:
    """A combined recipe of `recipes/` as prune-and-bench's setting and schedule."""
    return from_plan(load_plan(RECIPES_DIR / f"{name}.yaml"))


# every method at a heavier setting, tokens dropped from block 1 on (fused: the dropped tokens are
# merged into one, which keeps more accuracy), INT8 down to the patch embedding: the setting that
# shows how fast the methods together can make a model. Dropping tokens early matters because the
# first blocks, at full token count, spend their time in softmax, LayerNorm and shuffles, which INT8
# does not speed up
SPEED_RECIPE, _ = shipped_combined("combined-int8-speed")


def seed_calibration(loaders, seed: int) -> torch.Tensor:
    """The first CALIBRATION_IMAGES training images in the seed's shuffled order. Each seed draws its own,
    as the token rows and `vitsparse prune` do: the draw moves the speed recipe's top-1 by ~2 pt, so a
    seed spread over one fixed draw understates what a rerun on other images gives."""
    return torch.cat([x for x, _ in make_calibration(seeded_train_loader(loaders, seed), CALIBRATION_IMAGES)])


def combined_digits_row(setting: CombinedSetting, schedule: StagedSchedule, seeds: int,
                        ctx: DigitsContext) -> Row:
    """digits-vit through the recipe's staged schedule (`bench/staged.py`) over `seeds` seeds: the top-1
    after every stage, the final one as the mean over seeds; MACs and the artifact are seed 0's."""
    dense, loaders = ctx.dense, ctx.loaders

    def one_seed(_, seed: int) -> StagedRun:
        manager = PassManager(trace(copy.deepcopy(dense)), recipe=Recipe(base=ctx.base))
        calibration = seed_calibration(loaders, seed)
        return run_staged(manager, setting, schedule, dense, loaders, seed, calibration)

    desc = f"{ctx.model} {combined_setting_label(setting.settings())}"
    runs = over_seeds((setting,), seeds, one_seed, desc, ctx.progress, ctx.log)[setting]
    first = runs[0].manager
    finals = [run.stages[-1].top1 for run in runs]
    row = make_row(METHOD, setting.settings(), first.graph_module, statistics.fmean(finals),
                   statistics.fmean(run.oneshot for run in runs), model=ctx.model)
    row.top1_seeds = finals
    row.stages = [{"stage": stage.stage, "epochs": stage.epochs,
                   "top1": statistics.fmean(run.stages[i].top1 for run in runs),
                   "top1_seeds": [run.stages[i].top1 for run in runs]}
                  for i, stage in enumerate(runs[0].stages)]
    row.prune_seconds = round(statistics.fmean(sum(s.seconds for s in run.stages) for run in runs), 3)
    export_row(first.graph_module, first.recipe, row, ctx.artifacts)
    if setting.int8:  # every INT8 form on every engine that runs it, against the fake-quantized model
        row.verification = verify_formats(first.graph_module, first.recipe, ctx.test_images, ctx.artifacts,
                                          artifact_slug(row))
    return row


def combined_speed_graph(model: torch.nn.Module, setting: CombinedSetting, recipe: Recipe) -> PassManager:
    """The speed model through the recipe's float passes, every choice from weight norms; its INT8 form
    is the `int8_twin` of this graph, quantized with `setting.quant_config()`."""
    manager = PassManager(trace(model), recipe=recipe)
    if setting.vtp_rate > 0:
        scores_from_weight_norms(manager.run(ScoreGatePass()))
        manager.run(DimensionSlicePass(setting.vtp_rate, setting.multiple))
    if setting.head_budget > 0:
        indicators_from_weights(manager.run(HeadGatePass()))
        manager.run(HeadChannelSlicePass(setting.head_budget, setting.multiple))
    if setting.keep_rate < 1:
        manager.run(setting.token_drop_pass(manager.structure.depth))
    if setting.sparsity > 0:
        # per layer, whatever the recipe's scope: random weights give no global ranking worth keeping
        pattern = setting.mask_pattern
        manager.run(SparsityPass(saliency="magnitude", sparsity=setting.sparsity, pattern=pattern))
    return manager


SEEDS = 2  # seeds per combined recipe on digits-vit


@dataclass(frozen=True)
class RecipeSetting:
    """A combined recipe file read as a setting and its staged schedule (`+int8`: INT8 added last)."""

    source: str
    setting: CombinedSetting
    schedule: StagedSchedule


def recipe_path(text: str) -> Path:
    """A recipe file: a path, or the name of one in `recipes/` ('combined' -> recipes/combined.yaml)."""
    path = Path(text)
    if path.exists():
        return path
    if path.suffix in (".yaml", ".yml", ".json"):  # recipes/x.yaml from outside the repository too
        inside = RECIPES_DIR.parent / path
        return inside if not path.is_absolute() and inside.exists() else path
    return RECIPES_DIR / f"{text}.yaml"


class CombinedSpec(MethodSpec):
    name = METHOD
    example = "recipes/combined.yaml"
    summary = "RECIPE_FILE[+int8]"

    def parse(self, text: str) -> RecipeSetting:
        body, int8 = split_int8(text)
        path = recipe_path(body)
        if not path.exists():
            raise self.bad_setting(text, f"no recipe file {path}")
        try:
            setting, schedule = from_plan(load_plan(path))
        except ValueError as err:
            raise self.bad_setting(text, str(err)) from None
        return RecipeSetting(text, replace(setting, int8=True) if int8 else setting, schedule)

    def digits_rows(self, setting: RecipeSetting, ctx: DigitsContext) -> list[Row]:
        epochs = setting.schedule.epochs(setting.setting.passes())
        seeds = ctx.seeds_or(SEEDS)
        ctx.log(f"        {combined_setting_label(setting.setting.settings())}: staged, {epochs} epochs, "
                f"{seeds} seed(s)")
        return [combined_digits_row(setting.setting, setting.schedule, seeds, ctx)]

    def speed_candidates(self, setting: RecipeSetting, ctx: SpeedContext) -> list[SpeedCandidate]:
        """The float recipe, or (INT8 in the recipe) its INT8 forms in every timed format."""
        manager = combined_speed_graph(ctx.model, setting.setting, Recipe(base=ctx.base))
        recipe = ctx.candidate(METHOD, setting.setting.settings(), manager, export={"atol": SPEED_MODEL_ATOL})
        if not setting.setting.int8:
            return [recipe]
        return with_speed_twins(recipe, True, ctx, setting.setting.quant_config())[1:]

    def report_section(self, rows: list[Row], meta: dict) -> str:
        parts = []
        table = combined_table(rows)
        if table:
            parts.append(
                "## Combined recipes\n\nEvery landed method in one recipe, trained on digits-vit stage by "
                "stage, each stage recovering before the next, all distilled from the dense model: VTP "
                "scores trained, sliced and recovered; head channels sliced and recovered; token thresholds "
                "learned toward the FLOPs of the setting's keep rate, then a fine-tune; second-order (Fisher "
                "OBS) masks raised in cubic steps with recovery between them; INT8 calibrated, then "
                "fine-tuned quantization-aware. `epochs` is the whole training budget; the top-1 after each "
                "stage is the mean over the seeds, one-shot the first pass before any recovery. Token-drop "
                "locations are blocks of a 12-block model (scaled to digits-vit's 6).\n\n" + table)
        frontier = frontier_table(rows)
        if frontier:
            parts.append(
                "## The frontier: accuracy against speed\n\nEach combined recipe's digits-vit top-1 (mean "
                "± standard error over seeds) beside the speed-up of the same setting on the speed model "
                "(random weights, every choice from weight norms) over the best dense alternative of this "
                "run, per engine (its fastest precision column) and batch size.\n\n" + frontier)
        return "\n\n".join(parts)


SPEC = CombinedSpec()
