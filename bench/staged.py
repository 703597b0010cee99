"""The combined recipe's staged schedule on digits-vit: each pass recovers before the next one starts.

Slicing every dimension, dropping tokens, masking 80–90 % of the weights and quantizing, then one
fine-tune, leaves the model several points below dense: the damage of every pass lands at once. Here
each stage prunes a little and recovers, all distilled from the dense model:

1. `vtp`: scores trained with λ·‖â‖₁, sliced, recovery fine-tune;
2. `head-channels`: indicators from weight norms, sliced, recovery fine-tune;
3. `token-drop`: thresholds learned with the weights toward the FLOPs ratio the setting's keep rate
   gives (AS-ViT), counts read on calibration images, then a fine-tune on shifted images;
4. `masks`: second-order (Fisher OBS, global) masks raised in cubic steps, recovering between steps,
   then a fine-tune with the masks fixed;
5. `int8`: calibrated, then quantization-aware fine-tuning.

The top-1 after each stage is recorded, so a report shows what each pass costs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from vitsparse.compiler import PassManager
from vitsparse.models import evaluate, shifted_train_loader
from vitsparse.pruners import (
    DimensionSlicePass,
    FinetuneConfig,
    HeadChannelSlicePass,
    HeadGatePass,
    QuantizePass,
    ScoreGatePass,
    SparsityConfig,
    ThresholdConfig,
    TokenDropPass,
    finetune,
    indicators_from_weights,
    learn_thresholds,
    sparse_train,
)
from vitsparse.pruners.schedule import GradualConfig, gradual_prune

from .accuracy import seeded_train_loader

MASK_SALIENCY = "obs-fisher"
# the Fisher's diagonal blocks: 16 divides every width the recipe slices to (multiples of 16)
MASK_SOLVER = {"block_size": 16}
STAGE_OF_PASS = {"magnitude": "masks"}  # a recipe's pass name -> the stage that runs it
TOKEN_LR = 3e-3  # digits-vit's own training lr: the token-drop rows' fine-tune (bench/token_drop.py)


@dataclass(frozen=True)
class StagedSchedule:
    """Epochs of each stage; every training step distils from the dense model."""

    score_epochs: int = 4  # VTP score training before slicing
    recover_epochs: int = 4  # after each structured slice
    threshold_epochs: int = 4  # token thresholds learned with the weights
    token_epochs: int = 30  # after the keep counts are fixed (shifted images, lr 3e-3), as the token rows
    mask_steps: int = 3  # cubic steps up to the setting's sparsity
    mask_recover_epochs: int = 2  # after each mask step but the last
    mask_epochs: int = 10  # after the last mask step, masks fixed
    qat_epochs: int = 4
    lr: float = 1e-3

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if k != "lr" and (not isinstance(v, int) or v < 1)}
        if bad or self.lr <= 0:
            raise ValueError(f"staged schedule: epochs and steps must be integers >= 1 and lr > 0, got "
                             f"{bad or {'lr': self.lr}}")

    def stage_epochs(self) -> dict[str, int]:
        """Training epochs of each stage."""
        return {"vtp": self.score_epochs + self.recover_epochs, "head-channels": self.recover_epochs,
                "token-drop": self.threshold_epochs + self.token_epochs,
                "masks": (self.mask_steps - 1) * self.mask_recover_epochs + self.mask_epochs,
                "int8": self.qat_epochs}

    def epochs(self, passes: list[str]) -> int:
        """Training epochs in all for a recipe of these passes (the total budget a report states)."""
        per_stage = self.stage_epochs()
        return sum(per_stage[STAGE_OF_PASS.get(p, p)] for p in passes)


@dataclass
class StageResult:
    """One stage: its name, the test top-1 after it, its epochs and wall time."""

    stage: str
    top1: float
    epochs: int
    seconds: float


@dataclass
class StagedRun:
    manager: PassManager
    oneshot: float  # the first pass's model before any recovery
    stages: list[StageResult]


class _Stages:
    """What every stage shares: the dense teacher, the data, the seed, the recorded results."""

    def __init__(self, manager: PassManager, dense: torch.nn.Module, loaders, schedule: StagedSchedule,
                 seed: int, calibration: torch.Tensor) -> None:
        self.manager, self.dense, self.loaders, self.schedule = manager, dense, loaders, schedule
        self.seed, self.calibration = seed, calibration
        self.train = seeded_train_loader(loaders, seed)
        self.results: list[StageResult] = []
        self.oneshot: float | None = None
        self._started = time.perf_counter()

    def config(self, epochs: int, lr: float | None = None) -> FinetuneConfig:
        return FinetuneConfig(epochs=epochs, lr=lr or self.schedule.lr, warmup_steps=5, seed=self.seed)

    def tune(self, epochs: int, lr: float | None = None, loader=None) -> None:
        if self.oneshot is None:
            self.oneshot = self.top1()
        finetune(self.manager.graph_module, loader or self.train, None, self.config(epochs, lr),
                 teacher=self.dense, progress=False)

    def top1(self) -> float:
        return evaluate(self.manager.graph_module, self.loaders.test).top1

    def done(self, stage: str) -> None:
        seconds = time.perf_counter() - self._started
        epochs = self.schedule.stage_epochs()[stage]
        self.results.append(StageResult(stage, self.top1(), epochs, round(seconds, 2)))
        self._started = time.perf_counter()


def run_staged(manager: PassManager, setting, schedule: StagedSchedule, dense: torch.nn.Module, loaders,
               seed: int, calibration: torch.Tensor) -> StagedRun:
    """`setting` (a CombinedSetting) applied to `manager`'s graph stage by stage, recovering after each."""
    stages = _Stages(manager, dense, loaders, schedule, seed, calibration)
    if setting.vtp_rate > 0:
        gated = manager.run(ScoreGatePass())
        sparse_train(gated, stages.train, stages.config(schedule.score_epochs), teacher=dense, progress=False)
        manager.run(DimensionSlicePass(setting.vtp_rate, setting.multiple))
        stages.tune(schedule.recover_epochs)
        stages.done("vtp")
    if setting.head_budget > 0:
        indicators_from_weights(manager.run(HeadGatePass()))
        manager.run(HeadChannelSlicePass(setting.head_budget, setting.multiple))
        stages.tune(schedule.recover_epochs)
        stages.done("head-channels")
    if setting.keep_rate < 1:
        _token_stage(stages, setting)
    if setting.sparsity > 0:
        _mask_stage(stages, SparsityConfig(saliency=MASK_SALIENCY, sparsity=setting.sparsity,
                                           scope=setting.mask_scope, pattern=setting.mask_pattern,
                                           solver=MASK_SOLVER))
    if setting.int8:
        manager.run(QuantizePass(setting.quant_config(), calibration=calibration))
        stages.tune(schedule.qat_epochs, lr=1e-4)  # gentle: the calibrated ranges stay valid
        stages.done("int8")
    return StagedRun(manager, stages.oneshot if stages.oneshot is not None else stages.top1(), stages.results)


def _token_stage(stages: _Stages, setting) -> None:
    """Thresholds learned toward the FLOPs ratio of the setting's static keep rate, then a fine-tune."""
    manager, schedule = stages.manager, stages.schedule
    static = setting.token_drop_pass(manager.structure.depth)
    probe = PassManager(copy.deepcopy(manager.graph_module))
    probe.run(static)
    ratio = probe.costs.macs / manager.costs.macs
    locations = tuple(probe.recipe.passes[-1].params["locations"])
    learned = learn_thresholds(manager.graph_module, stages.train, ThresholdConfig(ratio, locations),
                               stages.config(schedule.threshold_epochs), stages.calibration,
                               teacher=stages.dense, progress=False)
    manager.run(TokenDropPass(thresholds=learned.thresholds, locations=locations, fuse=setting.fuse_tokens,
                              calibration=stages.calibration))
    stages.tune(schedule.token_epochs, lr=TOKEN_LR, loader=shifted_train_loader(stages.loaders, stages.seed))
    stages.done("token-drop")


def _mask_stage(stages: _Stages, config: SparsityConfig) -> None:
    """Second-order masks raised in cubic steps with recovery in between, then a fixed-mask fine-tune."""
    schedule = stages.schedule
    gradual_prune(stages.manager, config, GradualConfig(steps=schedule.mask_steps),
                  recover=lambda gm, step: stages.tune(schedule.mask_recover_epochs),
                  calibration=stages.calibration)
    stages.tune(schedule.mask_epochs)
    stages.done("masks")
