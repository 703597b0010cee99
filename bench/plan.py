"""Recipe files: the plan a user writes (YAML or JSON), checked whole before any work starts.

One concept, two states, named apart:
- the **plan** (`recipes/*.yaml`, `RecipePlan`): which stages run, in order, with their settings;
- the **record** (`recipe.json` in an artifact, `compiler.Recipe`): the passes that ran, each with the
  decisions it made, which `replay` rebuilds the pruned model from.

    name: vtp
    seed: 0
    stages:
      - vtp-scores: {epochs: 4, lr: 1.0e-3}
      - vtp-slice: {rate: 0.4}
      - finetune: {epochs: 4}

Every error names the file, the stage (number, kind and YAML line), the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .settings import SettingError, build_settings
from .stages import STAGES, Stage

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the shipped recipe files
PHASES = {1: "slicing", 2: "token dropping", 3: "masks", 4: "INT8"}


class PlanError(ValueError):
    """A recipe file that cannot run: one line naming where and why."""


@dataclass(frozen=True)
class PlanSettings:
    """The top-level keys of a recipe file besides `stages`."""

    name: str = ""
    description: str = ""
    seed: int = 0
    batch_size: int = 64
    calibration_images: int = 256  # training images second-order masks, head search and INT8 read
    int8_format: Literal["qdq", "operator"] = "qdq"  # QDQ: ONNX Runtime, OpenVINO; operator: DeepSparse
    # the artifact's pruned layers as vitsparse's sparse-kernel nodes, which only openvino-sparse runs
    sparse_kernels: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calibration_images < 1:
            raise ValueError(f"calibration_images must be >= 1, got {self.calibration_images}")
        if self.sparse_kernels and self.int8_format == "operator":
            raise ValueError("sparse_kernels: true needs int8_format: qdq (the sparse-kernel nodes replace "
                             "the QDQ layers; the operator format is DeepSparse's)")


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    line: int | None  # in the YAML file, 1-based

    @property
    def kind(self) -> str:
        return self.stage.kind


@dataclass(frozen=True)
class RecipePlan:
    """A checked recipe file: its settings and its stages in order."""

    settings: PlanSettings
    stages: tuple[PlannedStage, ...]
    source: str = "<plan>"

    def training_epochs(self) -> int:
        return sum(s.stage.training_epochs() for s in self.stages)

    def with_epochs(self, epochs: int) -> RecipePlan:
        """Every training step capped at `epochs` (a quick trial of a recipe; 0 stays 0)."""

        def capped(stage: Stage) -> Stage:
            if "epochs" not in {f.name for f in dataclasses.fields(stage)}:
                return stage
            return dataclasses.replace(stage, epochs=min(stage.epochs, epochs))

        stages = tuple(dataclasses.replace(s, stage=capped(s.stage)) for s in self.stages)
        return dataclasses.replace(self, stages=stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.settings),
            "stages": [{s.kind: s.stage.settings()} for s in self.stages],
        }

    def digest(self) -> str:
        """What a resumed run checks it continues: the same stages and settings."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_plan(path: str | os.PathLike) -> RecipePlan:
    """Read and check a recipe file (.yaml, .yml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"recipe file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        lines = [] if path.suffix == ".json" else stage_lines(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise PlanError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {' '.join(str(err).split())}"
        ) from None
    return parse_plan(data, str(path), lines)


def stage_lines(text: str) -> list[int]:
    """The 1-based line each item of the top-level `stages` list starts on."""
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "stages" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def parse_plan(data: Any, source: str = "<plan>", lines: list[int] | None = None) -> RecipePlan:
    """A RecipePlan from a loaded mapping; PlanError at the first thing wrong, before any work."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise PlanError(
            f"{source}: a recipe file is a mapping with a non-empty list `stages` (and optional "
            f"{', '.join(f.name for f in dataclasses.fields(PlanSettings))})"
        )
    top = {k: v for k, v in data.items() if k != "stages"}
    try:
        settings = build_settings(PlanSettings, top)
    except SettingError as err:
        raise PlanError(f"{source}: {err}") from None
    lines = lines or []
    stages = tuple(
        _stage(item, index, source, lines[index] if index < len(lines) else None)
        for index, item in enumerate(data["stages"])
    )
    check_order(stages, source)
    return RecipePlan(settings, stages, source)


def _where(source: str, index: int, kind: str | None, line: int | None) -> str:
    at = f", line {line}" if line else ""
    return f"{source}: stage {index + 1}{f' ({kind}' if kind else ' ('}{at})"


def _stage(item: Any, index: int, source: str, line: int | None) -> PlannedStage:
    if not isinstance(item, dict) or len(item) != 1:
        raise PlanError(
            f"{_where(source, index, None, line)}: write each stage as `- <kind>: {{settings}}`, got {item!r}"
        )
    ((kind, values),) = item.items()
    if kind not in STAGES:
        raise PlanError(
            f"{_where(source, index, str(kind), line)}: unknown stage; choose from {', '.join(STAGES)}"
        )
    try:
        stage = build_settings(STAGES[kind], values if values is not None else {})
    except SettingError as err:
        raise PlanError(f"{_where(source, index, kind, line)}: {err}") from None
    if not isinstance(values, (dict, type(None))):
        raise PlanError(f"{_where(source, index, kind, line)}: settings must be a mapping, got {values!r}")
    return PlannedStage(stage, line)


def check_order(stages: tuple[PlannedStage, ...], source: str) -> None:
    """Phases never go back (slicing, tokens, masks, INT8), a training step that readies a pass is
    followed by it, a pass that needs one is preceded by it, INT8 runs once."""
    phase, seen = 0, set()
    for index, planned in enumerate(stages):
        stage, where = planned.stage, _where(source, index, planned.kind, planned.line)
        previous = stages[index - 1].stage if index else None
        following = stages[index + 1].stage if index + 1 < len(stages) else None
        if stage.phase and stage.phase < phase:
            raise PlanError(
                f"{where}: {PHASES[stage.phase]} cannot come after {PHASES[phase]}; the order is "
                f"{', '.join(PHASES.values())} (training steps anywhere)"
            )
        if stage.kind == "int8" and "int8" in seen:
            raise PlanError(f"{where}: INT8 runs once")
        if stage.prepares and (following is None or following.kind != stage.prepares):
            raise PlanError(f"{where}: must be followed by a {stage.prepares} stage, which it trains for")
        needed = [
            kind for kind, cls in STAGES.items() if cls.prepares == stage.kind and kind != "token-thresholds"
        ]
        if needed and (previous is None or previous.kind != needed[0]):
            raise PlanError(
                f"{where}: needs a {needed[0]} stage right before it (it slices by what that "
                f"stage learns; epochs: 0 takes weight norms instead of training)"
            )
        if stage.after and stage.after not in seen:
            raise PlanError(f"{where}: runs only after a {stage.after} stage")
        phase, seen = max(phase, stage.phase), seen | {stage.kind}
