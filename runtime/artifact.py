"""An exported artifact directory opened for serving: checked whole before a server may start with it.

`vitsparse.compiler.export_artifact` writes model.onnx, meta.json (shapes, costs, per-layer sparsity,
preprocessing, labels, model.onnx's sha256), recipe.json and weights.safetensors. Serving needs the
first two; `load_artifact` refuses a directory that lacks them, whose meta.json does not parse or holds
a field the server cannot use, or whose model.onnx has no checksum, fails it, or fails the ONNX checker.

The checksum catches accidental damage (a copy cut short, a changed file). It does not stop someone who
can write the folder: they can rewrite meta.json too. `vitsparse verify ARTIFACT` goes further and
compares model.onnx with the recipe replayed on weights.safetensors (it needs torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RuntimeInputError, first_line
from .onnx_file import load_onnx
from .preprocess import Preprocessing, PreprocessingError

SERVING_FILES = ("model.onnx", "meta.json")
SHA256 = re.compile(r"[0-9a-f]{64}")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # safe in a URL path segment


class ArtifactError(RuntimeInputError):
    """An artifact directory a server cannot start with: missing, incomplete, or failing verification."""


@dataclass(frozen=True)
class Artifact:
    """One servable model: its name, files, metadata, preprocessing and (when known) class names."""

    name: str
    directory: Path
    meta: dict[str, Any] = field(repr=False)
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None

    @property
    def onnx_path(self) -> Path:
        return self.directory / "model.onnx"

    def sparsity_summary(self) -> dict[str, Any]:
        """Weights and zeros over every layer meta.json lists, with the MACs and the passes applied."""
        layers = self.meta.get("layers") or {}
        weights = sum(math.prod(int(d) for d in layer.get("shape", [])) for layer in layers.values())
        nonzero = sum(int(layer.get("nonzero", 0)) for layer in layers.values())
        return {"passes": list(self.meta.get("passes") or []), "macs": self.meta.get("macs"),
                "params": self.meta.get("params"), "nonzero_params": self.meta.get("nonzero_params"),
                "layer_weights": weights,
                "layer_sparsity": round(1 - nonzero / weights, 4) if weights else 0.0}


def parse_artifact_spec(spec: str) -> tuple[str | None, Path]:
    """`DIR` or `NAME=DIR` (the name defaults to the directory's own name)."""
    name, sep, path = spec.partition("=")
    if sep and name and not os.path.exists(spec):
        return name, Path(path)
    return None, Path(spec)


def load_artifact(path: str | os.PathLike, name: str | None = None) -> Artifact:
    """Open and verify an artifact directory for serving; ArtifactError says what is wrong with it."""
    directory = Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}" if not directory.exists()
                            else f"{directory} is a file; pass the artifact directory that holds model.onnx")
    name = name or directory.resolve().name
    if not MODEL_NAME.match(name):
        raise ArtifactError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 128); "
                            f"name it with NAME={directory}")
    missing = [file for file in SERVING_FILES if not (directory / file).is_file()]
    if missing:
        raise ArtifactError(f"{directory} is not a complete artifact: {', '.join(missing)} missing "
                            f"(export it with vitsparse.compiler.export_artifact)")
    meta = _read_meta(directory / "meta.json")
    _verify_onnx(directory / "model.onnx", _recorded_sha256(directory / "meta.json", meta))
    try:
        preprocessing = Preprocessing.from_meta(meta.get("preprocessing") or {})
    except PreprocessingError as exc:
        raise ArtifactError(f"{directory}/meta.json: {exc} (re-export with this vitsparse, which records "
                            f"the model's preprocessing)") from None
    labels = _labels(directory / "meta.json", meta.get("labels"))
    _check_layers(directory / "meta.json", meta.get("layers"))
    return Artifact(name, directory, meta, preprocessing, labels)


def _recorded_sha256(path: Path, meta: dict[str, Any]) -> str:
    digest = meta.get("onnx_sha256")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise ArtifactError(f"{path}: onnx_sha256 is missing or not a sha256 hex digest; the server serves "
                            f"only a model.onnx it can check (re-export it with vitsparse)")
    return digest


def _labels(path: Path, labels: object) -> tuple[str, ...] | None:
    """meta.json's class names: absent, null or a list of strings."""
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ArtifactError(f"{path}: labels must be a list of strings (one per class), got "
                            f"{type(labels).__name__}" + ("" if not isinstance(labels, list) else
                                                          " holding other values"))
    return tuple(labels) or None


def _check_layers(path: Path, layers: object) -> None:
    """meta.json's per-layer sparsity: {name: {"shape": [ints], "nonzero": int, ...}}, or absent."""
    if layers is None:
        return
    natural = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(layers, dict) or not all(
            isinstance(layer, dict) and isinstance(layer.get("shape", []), list)
            and all(natural(d) for d in layer.get("shape", [])) and natural(layer.get("nonzero", 0))
            for layer in layers.values()):
        raise ArtifactError(f'{path}: layers must map each layer to {{"shape": [sizes], "nonzero": count}}')


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not readable JSON: {first_line(exc)}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _verify_onnx(path: Path, expected_sha256: str) -> None:
    """The file matches the checksum export recorded and passes the ONNX checker."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    if digest.hexdigest() != expected_sha256:
        raise ArtifactError(f"{path} does not match the sha256 meta.json recorded at export: the file "
                            f"changed or was cut short since; re-export or copy it again")
    try:
        load_onnx(path)
    except (RuntimeInputError, FileNotFoundError) as exc:
        raise ArtifactError(str(exc)) from None
