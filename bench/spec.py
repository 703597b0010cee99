"""A prune-and-bench method as one spec: how its setting is written, the digits-vit rows it makes, the
speed-model graphs it times and the report section it adds.

The workflow is a loop over a profile's entries (method, setting); the report a loop over the specs.
A method is one module defining a `MethodSpec` subclass plus one line in `registry.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitsparse.compiler import PassManager, attention_macs

from .schema import Row
from .speed import SpeedCandidate

INT8_SUFFIX = "+int8"  # `vtp=0.4+int8`: the setting and its INT8 twin


@dataclass(frozen=True)
class Entry:
    """One (method, setting) of a profile, `setting` as written after `method=`; where it runs."""

    method: str
    setting: str
    digits: bool = True  # an accuracy row on digits-vit
    speed: bool = True  # a timed row on the speed model

    @property
    def label(self) -> str:
        return f"{self.method}={self.setting}"


def split_int8(text: str) -> tuple[str, bool]:
    """('0.4', True) from '0.4+int8'."""
    return (text[: -len(INT8_SUFFIX)], True) if text.endswith(INT8_SUFFIX) else (text, False)


@dataclass
class DigitsContext:
    """What every digits-vit row needs: the trained dense model, its data, where artifacts go, the
    standard fine-tune's epochs, seeds per row (None: the spec's own) and how to report progress."""

    dense: torch.nn.Module
    loaders: Any  # models.DigitsLoaders: train, val, test
    artifacts: Path
    epochs: int
    long_epochs: int | None = None  # overrides a method's long fine-tune (tokens: 30 epochs) when given
    seeds: int | None = None
    progress: bool = False  # bars in a terminal
    log: Callable[[str], None] = print
    model: str = "digits-vit"

    @property
    def base(self) -> dict:
        """A recipe's base: how to rebuild the dense model."""
        return {"model": self.model, "kwargs": {}, "pretrained": True}

    def seeds_or(self, default: int) -> int:
        return self.seeds if self.seeds is not None else default

    @functools.cached_property
    def test_images(self) -> torch.Tensor:
        return torch.cat([x for x, _ in self.loaders.test])


@dataclass
class SpeedContext:
    """What every speed row needs: the speed model (random weights unless the user gave some), its
    recipe base, calibration batches for the data-aware solvers and INT8 ranges, and the INT8 formats
    whose engines are timed."""

    model: torch.nn.Module
    model_name: str
    base: dict
    calibration: list  # [(images, labels)] batches
    calibration_samples: int
    int8_calibration: list
    int8_formats: tuple[str, ...] = ()
    log: Callable[[str], None] = print
    export: dict = field(default_factory=dict)  # ExportConfig fields of every INT8 twin

    def row(self, method: str, settings: dict, manager: PassManager) -> Row:
        """A speed-model row with the graph's MACs and parameters."""
        costs = manager.costs
        return Row(model=self.model_name, method=method, settings=settings, macs=costs.macs,
                   attention_macs=attention_macs(manager.graph_module, manager.structure, costs),
                   params=costs.params, nonzero_params=costs.nonzero_params)

    def candidate(self, method: str, settings: dict, manager: PassManager, **kwargs) -> SpeedCandidate:
        return SpeedCandidate(self.row(method, settings, manager), manager.graph_module, manager.recipe,
                              **kwargs)


class MethodSpec:
    """One method. Subclasses set `name`, `example` and `summary` and override what they contribute."""

    name: str = ""
    example: str = ""  # a setting, as in `--only NAME=EXAMPLE`
    summary: str = ""  # the setting's syntax in a few words, for --help
    section: str | None = None  # specs sharing a section key write one report section (the first one's)

    def parse(self, text: str) -> Any:
        """The setting `text` stands for; ValueError naming the syntax when it is wrong."""
        raise NotImplementedError

    def check(self, setting: Any, model: torch.nn.Module) -> None:
        """ValueError before any work when `setting` cannot apply to `model` (the speed model)."""

    def digits_rows(self, setting: Any, ctx: DigitsContext) -> list[Row]:
        """Accuracy rows on digits-vit for one setting."""
        return []

    def speed_candidates(self, setting: Any, ctx: SpeedContext) -> list[SpeedCandidate]:
        """Graphs of the speed model to time for one setting."""
        return []

    def shared_baselines(self, setting: Any, ctx: SpeedContext) -> list[str]:
        """Labels (Row.label) of the workflow's baselines this setting also stands for, which
        `speed_candidates` leaves out rather than build them twice: the report counts them with it."""
        return []

    def report_section(self, rows: list[Row], meta: dict) -> str:
        """This method's part of report.md ('' when it has nothing to say)."""
        return ""

    def plots(self, rows: list[Row]) -> dict[str, Callable[[Path], None]]:
        """File name -> writer of the plots this method adds to the run folder."""
        return {}

    def bad_setting(self, text: str, why: str = "") -> ValueError:
        return ValueError(f"bad {self.name} setting {text!r} (write e.g. {self.name}={self.example}; "
                          f"{self.summary})" + (f": {why}" if why else ""))


def split_choice(spec: MethodSpec, text: str, choices, default: str) -> tuple[str, str, bool]:
    """('0.3', 'l1', True) from '0.3:l1+int8': the number, a choice among `choices` (else `default`), and
    whether the INT8 twin is asked for."""
    body, int8 = split_int8(text)
    number, _, choice = body.partition(":")
    choice = choice or default
    if choice not in choices:
        raise spec.bad_setting(text, f"unknown {choice!r}; choose from {', '.join(choices)}")
    return number, choice, int8


def parse_fraction(spec: MethodSpec, text: str, low: float = 0.0, high: float = 1.0,
                   high_included: bool = False) -> float:
    """A number in [low, high) (or [low, high]) or the spec's bad-setting error."""
    try:
        value = float(text)
    except ValueError:
        raise spec.bad_setting(text) from None
    if not (low <= value < high or (high_included and value == high)):
        bound = "]" if high_included else ")"
        raise spec.bad_setting(text, f"must lie in [{low:g}, {high:g}{bound}")
    return value
