"""`vitsparse verify ARTIFACT`: does model.onnx still compute what the recipe, replayed on the weights,
computes? The server's checksum only says a file is the one meta.json names; this re-runs the export's
check from the other two files, so a model.onnx swapped together with its checksum is caught."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

import vitsparse.pruners  # noqa: F401  (registers every pass that replay may meet)
from vitsparse.compiler import ExportConfig, Recipe, fold_for_export
from vitsparse.compiler.export import file_sha256, verification_limit, verify_onnx
from vitsparse.compiler.recipe import RecipeError, load_weights, replay
from vitsparse.models import build_model
from vitsparse.runtime.artifact import Artifact, ArtifactError, load_artifact


@dataclass(frozen=True)
class Verification:
    """The largest difference between model.onnx and the replayed graph, and the export's limit."""

    directory: Path
    max_abs_diff: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.limit


def verify_artifact(directory: str | os.PathLike) -> Verification:
    """Check an artifact's files against each other; ArtifactError names what does not match."""
    artifact = load_artifact(directory)  # model.onnx against its checksum, meta.json's fields
    meta = artifact.meta
    graph = rebuild_graph(artifact)
    config = ExportConfig(batch_size=int(meta.get("batch_size", 1)), opset=int(meta.get("opset", 14)),
                          dynamic_batch=bool(meta.get("dynamic_batch")),
                          feature_select=meta.get("feature_select", "gather"))
    folded = fold_for_export(graph, config.feature_select)
    limit = meta.get("verification_limit") or verification_limit(config, bool(meta.get("quantization")))
    return Verification(artifact.directory, verify_onnx(artifact.onnx_path, folded, config), float(limit))


def rebuild_graph(artifact: Artifact) -> fx.GraphModule:
    """The artifact's PyTorch model: recipe.json replayed on its base model, weights.safetensors loaded
    (after checking them against their sha256)."""
    folder = artifact.directory
    _check_weights_digest(folder / "weights.safetensors", artifact.meta.get("weights_sha256"))
    try:
        recipe = Recipe.load(folder / "recipe.json")
        if not isinstance(recipe.base.get("model"), str):
            raise ArtifactError(f"{folder}/recipe.json names no base model to replay the passes on")
        model = build_model(recipe.base["model"], **(recipe.base.get("kwargs") or {}))  # weights replace all
        return load_weights(replay(model, recipe), folder / "weights.safetensors")
    except (RecipeError, FileNotFoundError) as exc:
        raise ArtifactError(f"{folder}: cannot rebuild the model from recipe.json and weights.safetensors: "
                            f"{exc}") from None


def torch_reference(artifact: Artifact):
    """The artifact's PyTorch model as a function of preprocessed images (numpy in, logits out)."""
    folded = fold_for_export(rebuild_graph(artifact))

    def logits(pixels):
        with torch.inference_mode():
            return folded(torch.from_numpy(pixels)).numpy()

    return logits


def _check_weights_digest(path: Path, expected: object) -> None:
    """weights.safetensors against the sha256 export recorded (artifacts from before it are let through)."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: verify needs the weights the export wrote")
    if expected is not None and file_sha256(path) != expected:
        raise ArtifactError(f"{path} does not match the sha256 meta.json recorded at export")
