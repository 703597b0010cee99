"""The Pass interface, the pass registry and the manager that runs passes and records them.

A pass is an object with a `name` and a `__call__(gm, structure) -> PassResult`. It decides what
to change, rewrites the graph and returns a `PassRecord` holding its settings and every decision
it took, so that `from_record(record)` rebuilds a pass that replays the same decisions on a fresh
trace without looking at weights or data again.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from .errors import PassError, RecipeError
from .flops import count_costs
from .structure import ViTStructure, find_vit_structure
from .trace import carry_meta, input_shape_of


@dataclass
class PassRecord:
    """What one pass did: its registered name, settings, decisions and cost before/after."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    decisions: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "decisions": self.decisions, "stats": self.stats}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassRecord:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise RecipeError(f"a pass record must be an object with a string 'name', got {data!r:.80}")
        unknown = set(data) - {"name", "params", "decisions", "stats"}
        if unknown:
            raise RecipeError(f"pass record {data['name']!r} has unknown fields {sorted(unknown)}")
        return cls(data["name"], dict(data.get("params", {})), dict(data.get("decisions", {})),
                   dict(data.get("stats", {})))


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    record: PassRecord


class GraphPass(ABC):
    """A graph rewrite. Subclasses set `name`, implement `__call__` and `from_record`."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        """Rewrite `gm` (in place or into a new GraphModule) and report what was done."""

    @classmethod
    @abstractmethod
    def from_record(cls, record: PassRecord) -> GraphPass:
        """A pass that re-applies exactly the decisions stored in `record`."""


PASS_REGISTRY: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: make a pass replayable from recipes under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PassError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    existing = PASS_REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise PassError(f"pass name {name!r} is already taken by {existing.__qualname__}")
    PASS_REGISTRY[name] = cls
    return cls


def pass_from_record(record: PassRecord) -> GraphPass:
    """Look up the registered pass named in `record` and configure it to replay the record."""
    try:
        cls = PASS_REGISTRY[record.name]
    except KeyError:
        known = ", ".join(sorted(PASS_REGISTRY)) or "none registered"
        raise RecipeError(f"recipe names unknown pass {record.name!r} (known: {known}); import the "
                          "module that defines it before replaying") from None
    return cls.from_record(record)


@register_pass
class IdentityPass(GraphPass):
    """Changes nothing; the reference for 'a pass that removes nothing keeps the outputs'."""

    name = "identity"

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        return PassResult(gm, PassRecord(self.name))

    @classmethod
    def from_record(cls, record: PassRecord) -> IdentityPass:
        return cls()


class PassManager:
    """Runs passes over one graph: lint and recompile after each, re-derive the structure, record it.

Each record's `stats` holds the costs before and after and the seconds the pass took; a pass may
add stats of its own (e.g. how many calibration images it used).

    `on_pass` (optional) is called with each new record, e.g. to log progress.
    """

    def __init__(self, gm: fx.GraphModule, recipe: Any | None = None,
                 on_pass: Callable[[PassRecord], None] | None = None) -> None:
        from .recipe import Recipe  # recipe imports passes for replay; import late to avoid a cycle

        self.graph_module = gm
        self.structure = find_vit_structure(gm)
        self.recipe = recipe if recipe is not None else Recipe()
        if self.recipe.input_shape is None:  # replay must trace at the size this graph was traced at
            self.recipe.input_shape = input_shape_of(gm)
        self.costs = count_costs(gm)  # kept current so each pass's "before" costs nothing to get
        self._on_pass = on_pass

    def run(self, graph_pass: GraphPass) -> fx.GraphModule:
        """Apply one pass, check the new graph, and append the pass's record to the recipe."""
        before = self.costs
        started = time.perf_counter()
        result = graph_pass(self.graph_module, self.structure)
        seconds = time.perf_counter() - started
        gm = result.graph_module
        carry_meta(self.graph_module, gm)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        self.structure = find_vit_structure(gm)
        self.costs = count_costs(gm)
        result.record.stats = {**result.record.stats, "before": before.as_dict(),
                               "after": self.costs.as_dict(), "seconds": round(seconds, 3)}
        self.graph_module = gm
        self.recipe.passes.append(result.record)
        if self._on_pass is not None:
            self._on_pass(result.record)
        return gm

    def run_all(self, passes: list[GraphPass]) -> fx.GraphModule:
        for graph_pass in passes:
            self.run(graph_pass)
        return self.graph_module
