"""The recipe: a replayable, versioned JSON record of every pass applied to a base model.

A pruned model is stored as base model id + recipe + weights. `replay` rebuilds the pruned graph
by tracing a fresh base model and re-running each recorded pass; the weights then load from a
safetensors file. No module is ever pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file
from torch import nn

from vitsparse.runtime.atomic import atomic_path

from .errors import RecipeError
from .passes import PassManager, PassRecord, pass_from_record
from .trace import trace

SCHEMA_VERSION = 1


@dataclass
class Recipe:
    """`base` says how to rebuild the unpruned model ({"model": name, "kwargs": {...}}, free-form)."""

    base: dict[str, Any] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    input_shape: tuple[int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "base": self.base,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "passes": [p.to_dict() for p in self.passes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise RecipeError(f"recipe schema {schema!r} is not supported (this vitsparse reads schema "
                              f"{SCHEMA_VERSION})")
        passes = data.get("passes", [])
        if not isinstance(passes, list) or not isinstance(data.get("base", {}), dict):
            raise RecipeError("recipe fields: 'base' must be an object and 'passes' a list")
        shape = data.get("input_shape")
        return cls(base=dict(data.get("base", {})), passes=[PassRecord.from_dict(p) for p in passes],
                   input_shape=tuple(shape) if shape else None)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as JSON atomically (temp file in the same folder, then rename)."""
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return cls.from_json(path.read_text(encoding="utf-8"))


def replay(base_model: nn.Module, recipe: Recipe) -> fx.GraphModule:
    """Trace `base_model` afresh and re-apply every pass of `recipe` with its recorded decisions."""
    gm = trace(base_model, recipe.input_shape)
    manager = PassManager(gm, recipe=Recipe(base=recipe.base, input_shape=recipe.input_shape))
    for record in recipe.passes:
        manager.run(pass_from_record(record))
    return manager.graph_module


def save_weights(gm: nn.Module, path: str | os.PathLike) -> Path:
    """Save a graph's state dict to safetensors atomically."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in gm.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


def load_weights(gm: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights into a replayed graph; a shape mismatch names the tensors."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise RecipeError(f"cannot read weights {path}: {err}") from None
    own = gm.state_dict()
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs graph {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise RecipeError(f"weights {path} do not fit the replayed graph (was the recipe the one saved "
                          f"with them?): mismatched {mismatched[:5]}, missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        gm.load_state_dict(state, strict=True)
    return gm
