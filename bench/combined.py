"""The combined recipes: every method that has landed, applied to one model in turn.

Dimension slicing (VTP), head-equal channel removal, token dropping and unstructured masks compose as
passes of one recipe: shapes shrink first, then the sequence, then the weights turn to zeros; with
`int8`, static INT8 ends it. On digits-vit the recipe trains stage by stage (`staged.py`: each pass
recovers before the next, distilled from the dense model, over several seeds). The speed model, with
random weights, gets every choice from weight norms (static keep counts, magnitude masks): its rows
measure the shapes and zeros the recipe yields. `FRONTIER` lists the INT8 recipes from light to heavy.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, fields
from typing import Any

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import build_model, digits_loaders
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

from .accuracy import CALIBRATION_IMAGES, MODEL, export_row, make_row, over_seeds, seeded_train_loader
from .int8 import OBSERVER as INT8_OBSERVER
from .int8 import verify_formats
from .labels import combined_setting_label
from .plan import RECIPES_DIR, RecipePlan, load_plan
from .schema import Row
from .speed import artifact_slug
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
    found: dict[str, Any] = {}
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
    found.update(keep_rate=stage.keep_rate, token_epochs=after, fuse_tokens=stage.fuse,
                 token_locations=stage.locations)


def _read_thresholds(stage, after, found) -> None:
    found.update(threshold_epochs=stage.epochs)


def _read_masks(stage, after, found) -> None:
    if (stage.saliency, stage.scope, stage.solver) != (MASK_SALIENCY, "global", MASK_SOLVER):
        raise ValueError(f"the combined rows' masks are {MASK_SALIENCY}, global, solver {MASK_SOLVER}")
    found.update(sparsity=stage.sparsity, mask_steps=stage.steps, mask_recover_epochs=stage.epochs,
                 mask_epochs=after)


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


# every method in one recipe at the settings of recipes/combined.yaml
COMBINED, COMBINED_SCHEDULE = shipped_combined("combined")
# every method at a heavier setting, tokens dropped from block 1 on (fused, which costs DeepSparse ~3 %
# and gains digits-vit ~3 pt), INT8 down to the patch embedding: measured on deit_small at batch 16,
# 10–11x dense PyTorch on DeepSparse where `CombinedSetting(int8=True)` gave ~3x (the first blocks, at
# full token count, cost most there: softmax, LayerNorm and shuffles, not the INT8 products);
# recipes/combined-int8-speed.yaml
SPEED_RECIPE, _ = shipped_combined("combined-int8-speed")

# the INT8 recipes from light to heavy that the report plots as a frontier (top-1 against speed): the
# float recipe's setting in INT8, one lighter, one between it and the speed recipe, and the speed recipe
FRONTIER = (
    CombinedSetting(vtp_rate=0.1, head_budget=0.2, keep_rate=0.85, sparsity=0.5, int8=True),
    CombinedSetting(int8=True),
    CombinedSetting(vtp_rate=0.3, head_budget=0.4, keep_rate=0.55, sparsity=0.85, int8=True,
                    token_locations=(3, 6, 9), fuse_tokens=True),
    SPEED_RECIPE,
)


def seed_calibration(loaders, seed: int) -> torch.Tensor:
    """The first CALIBRATION_IMAGES training images in the seed's shuffled order. Each seed draws its own,
    as the token rows and `vitsparse prune` do: the draw moves the speed recipe's top-1 by ~2 pt, so a
    seed spread over one fixed draw understates what a rerun on other images gives."""
    return torch.cat([x for x, _ in make_calibration(seeded_train_loader(loaders, seed), CALIBRATION_IMAGES)])


def combined_digits_row(setting: CombinedSetting, schedule: StagedSchedule, seeds: int, artifacts,
                        progress: bool = False) -> Row:
    """digits-vit through the recipe's staged schedule (`bench/staged.py`) over `seeds` seeds: the top-1
    after every stage, the final one as the mean over seeds; MACs and the artifact are seed 0's."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}

    def one_seed(_, seed: int) -> StagedRun:
        manager = PassManager(trace(copy.deepcopy(dense)), recipe=Recipe(base=base))
        calibration = seed_calibration(loaders, seed)
        run = run_staged(manager, setting, schedule, dense, loaders, seed, calibration)
        if not progress:  # a log gets a line per seed (a bar shows them in a terminal)
            seconds = sum(stage.seconds for stage in run.stages)
            print(f"        seed {seed}: top-1 {100 * run.stages[-1].top1:.2f} % ({seconds:.0f} s)",
                  flush=True)
        return run

    runs = over_seeds((setting,), seeds, one_seed, f"digits-vit {combined_setting_label(setting.settings())}",
                      progress)[setting]
    first = runs[0].manager
    finals = [run.stages[-1].top1 for run in runs]
    row = make_row(METHOD, setting.settings(), first.graph_module, statistics.fmean(finals),
                   statistics.fmean(run.oneshot for run in runs))
    row.top1_seeds = finals
    row.stages = [{"stage": stage.stage, "epochs": stage.epochs,
                   "top1": statistics.fmean(run.stages[i].top1 for run in runs),
                   "top1_seeds": [run.stages[i].top1 for run in runs]}
                  for i, stage in enumerate(runs[0].stages)]
    row.prune_seconds = round(statistics.fmean(sum(s.seconds for s in run.stages) for run in runs), 3)
    export_row(first.graph_module, first.recipe, row, artifacts)
    if setting.int8:  # every INT8 form on every engine that runs it, against the fake-quantized model
        images = torch.cat([x for x, _ in loaders.test])
        row.verification = verify_formats(first.graph_module, first.recipe, images, artifacts,
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
        manager.run(SparsityPass(saliency="magnitude", sparsity=setting.sparsity))
    return manager
