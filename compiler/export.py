"""The export pass: fold training-time modules away, write ONNX, verify it, write one artifact dir.

ONNX is written with the TorchScript exporter (`dynamo=False`) at a static batch size and opset
14 by default: opset 17 turns LayerNorm into `LayerNormalization`, which DeepSparse 1.8 does not
run natively (part of the graph then falls outside its runtime). Verification
runs the file with onnx's reference evaluator, so the compiler needs no inference engine.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import nn

from vitsparse.runtime.atomic import atomic_dir
from vitsparse.runtime.kernel_crossover import default_min_sparsity

from .errors import CompilerError
from .flops import count_costs
from .quantized_onnx import count_integer_layers, fold_weight_quantizers, to_operator_format
from .recipe import Recipe, save_weights
from .rewrite import SelectFeatures
from .sparse_onnx import SparseLinear, SparseMLP, to_sparse_kernels
from .trace import INPUT_SHAPE_KEY, SERVING_KEY, carry_meta, example_input, input_shape_of

SUPPORTED_OPSETS = range(14, 18)
FEATURE_SELECT_FORMS = ("gather", "matmul", "gather-last")
QUANT_FORMATS = ("qdq", "operator")
SPARSE_PRECISIONS = ("f32", "bf16")
# the feature-selection forms other than the module's own (Transpose, Gather, Transpose)
SELECT_FORMS = {"matmul": SelectFeatures.as_matmul, "gather-last": SelectFeatures.as_last_axis_gather}
ARTIFACT_FILES = ("model.onnx", "recipe.json", "weights.safetensors", "meta.json")


class ExportError(CompilerError):
    """Export failed or the exported model does not match the torch model."""


@dataclass(frozen=True)
class ExportConfig:
    batch_size: int = 1
    opset: int = 14
    atol: float = 1e-3  # the export fails above this max abs difference
    verify_batches: int = 1
    # how a feature selection (VTP's sliced qkv/fc1 inputs) is written: "gather" (rows of the transposed
    # tensor: fast on ONNX Runtime), "matmul" by a constant one-hot matrix (DeepSparse runs it sparse;
    # it has no Gather) or "gather-last", one Gather on the last axis (OpenVINO)
    feature_select: str = "gather"
    # a symbolic batch dimension, so one file runs at any batch size (what a batching server needs);
    # verified at batch_size and batch_size + 1
    dynamic_batch: bool = False
    # a fake-quantized (INT8) graph: "qdq" (QuantizeLinear/DequantizeLinear, for ONNX Runtime) or
    # "operator" (MatMulInteger/ConvInteger with the scales folded, for DeepSparse); verified within
    # quant_atol, since torch rounds x·(1/s) where ONNX rounds x/s and a tie can land one step apart
    quant_format: str = "qdq"
    quant_atol: float = 0.1
    # pruned MatMuls with at least sparse_min_sparsity zeros become SparseLinear nodes that only the
    # `openvino-sparse` engine runs (vitsparse's kernels); None: the kernels' measured crossover for
    # each layer's precision on this CPU (runtime/kernel_crossover.py; higher where it has AMX). Float
    # layers run in sparse_precision: "f32", or "bf16" (weights and inputs rounded to bfloat16, 1×2
    # blocks), verified within bf16_atol
    sparse_kernels: bool = False
    sparse_min_sparsity: float | None = None
    sparse_precision: str = "f32"
    bf16_atol: float = 0.1

    def __post_init__(self) -> None:
        if self.quant_format not in QUANT_FORMATS:
            raise ExportError(f"quant_format must be one of {QUANT_FORMATS}, got {self.quant_format!r}")
        if self.feature_select not in FEATURE_SELECT_FORMS:
            raise ExportError(f"feature_select must be one of {FEATURE_SELECT_FORMS}, "
                              f"got {self.feature_select!r}")
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportError(f"opset {self.opset} is not supported; use 14–17 (14 runs fully on DeepSparse)")
        if self.batch_size < 1:
            raise ExportError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sparse_min_sparsity is not None and not 0.0 <= self.sparse_min_sparsity <= 1.0:
            raise ExportError(f"sparse_min_sparsity must be within [0, 1], got {self.sparse_min_sparsity}")
        if self.sparse_precision not in SPARSE_PRECISIONS:
            raise ExportError(f"sparse_precision must be one of {SPARSE_PRECISIONS}, "
                              f"got {self.sparse_precision!r}")
        if self.sparse_kernels and self.quant_format == "operator":
            raise ExportError("sparse_kernels replaces the QDQ layers; it cannot be combined with "
                              "quant_format='operator'")


def fold_for_export(gm: fx.GraphModule, feature_select: str = "gather") -> fx.GraphModule:
    """A CPU float32 copy where every module offering `export_module()` (masked layers, gates) is
    replaced by the plain module it computes, and fx's input-size asserts are dropped.

    `feature_select` "matmul" writes each feature selection as a product with a one-hot matrix,
    "gather-last" as one Gather on the last axis.
    """
    folded = copy.deepcopy(gm).cpu().float().eval()
    for name, module in list(folded.named_modules()):
        if isinstance(module, SelectFeatures) and feature_select in SELECT_FORMS:
            parent, _, child = name.rpartition(".")
            rewritten = SELECT_FORMS[feature_select](module)
            setattr(folded.get_submodule(parent) if parent else folded, child, rewritten)
        elif name and hasattr(module, "export_module"):
            parent, _, child = name.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, child, module.export_module())
    for node in reversed(list(folded.graph.nodes)):
        if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_assert"):
            folded.graph.erase_node(node)
    folded.graph.eliminate_dead_code()
    folded.graph.lint()
    folded.recompile()
    folded.meta[INPUT_SHAPE_KEY] = input_shape_of(gm)
    carry_meta(gm, folded)
    return folded


def write_onnx(gm: fx.GraphModule, path: Path, config: ExportConfig) -> None:
    """Export a folded graph to ONNX at a static batch size."""
    sample = example_input(gm, config.batch_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-derived Python ints are expected
        try:
            dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if config.dynamic_batch else None
            torch.onnx.export(gm, (sample,), str(path), dynamo=False, opset_version=config.opset,
                              input_names=["input"], output_names=["logits"], do_constant_folding=True,
                              dynamic_axes=dynamic)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err


def finish_quantized(path: Path, config: ExportConfig) -> dict[str, Any] | None:
    """Store a fake-quantized export's weights as INT8 codes and write the configured format in
    place; None (file untouched) when the graph holds no quantized layer."""
    model = onnx.load(str(path))
    if not any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        return None
    fold_weight_quantizers(model)
    layers = count_integer_layers(model)["qdq"]
    if config.quant_format == "operator":
        to_operator_format(model)
    onnx.save(model, str(path))
    return {"format": config.quant_format, "layers": layers}


def finish_sparse(path: Path, config: ExportConfig) -> dict[str, Any] | None:
    """Rewrite pruned MatMuls into SparseLinear nodes when the config asks; what was done, or None."""
    if not config.sparse_kernels:
        return None
    chosen = config.sparse_min_sparsity
    threshold = default_min_sparsity(config.sparse_precision) if chosen is None else chosen
    int8_threshold = default_min_sparsity("int8") if chosen is None else chosen
    model = onnx.load(str(path))
    layers = to_sparse_kernels(model, threshold, config.sparse_precision, int8_threshold)
    onnx.save(model, str(path))
    return {"layers": layers, "min_sparsity": threshold, "int8_min_sparsity": int8_threshold,
            "precision": config.sparse_precision}


def verify_onnx(path: Path, gm: fx.GraphModule, config: ExportConfig) -> float:
    """Max abs difference between the ONNX file (reference evaluator) and the torch graph."""
    from onnx.reference import ReferenceEvaluator

    from .reference_ops import FAST_REFERENCE_OPS

    evaluator = ReferenceEvaluator(str(path), new_ops=[*FAST_REFERENCE_OPS, SparseLinear, SparseMLP])
    worst = 0.0
    sizes = (config.batch_size, config.batch_size + 1) if config.dynamic_batch else (config.batch_size,)
    for seed, batch_size in itertools.product(range(config.verify_batches), sizes):
        sample = example_input(gm, batch_size, seed=100 + seed)
        with torch.no_grad():
            expected = gm(sample).numpy()
        (got,) = evaluator.run(None, {"input": sample.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def verification_limit(config: ExportConfig, quantized: bool, bf16: bool = False) -> float:
    """The largest difference from torch an export may show: atol, or quant_atol for an INT8 file, or
    bf16_atol for one with bfloat16 sparse layers (the larger of those that apply)."""
    return max(config.atol, config.quant_atol if quantized else 0.0, config.bf16_atol if bf16 else 0.0)


def layer_sparsity(gm: nn.Module) -> dict[str, dict[str, float | int]]:
    """Per weight matrix/kernel of a folded graph: shape, non-zeros and sparsity."""
    layers = {}
    for name, module in gm.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None:
            nonzero = int(weight.count_nonzero())
            layers[name] = {"shape": list(weight.shape), "nonzero": nonzero,
                            "sparsity": 1.0 - nonzero / weight.numel()}
    return layers


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("vitsparse", "torch", "timm", "onnx", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


@dataclass
class ExportResult:
    """Where the artifact landed and what export measured."""

    directory: Path
    max_abs_diff: float
    meta: dict[str, Any] = field(repr=False)


def serving_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """meta.json's `preprocessing` and `labels`: what a server needs to classify an image file."""
    info = gm.meta.get(SERVING_KEY) or {}
    preprocessing = dict(info.get("preprocessing") or {})
    preprocessing["input_size"] = list(input_shape_of(gm))
    return {"preprocessing": preprocessing, "labels": info.get("labels")}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (a server checks model.onnx against it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def export_artifact(gm: fx.GraphModule, recipe: Recipe, directory: str | os.PathLike,
                    config: ExportConfig | None = None, *, overwrite: bool = False,
                    extra_meta: dict[str, Any] | None = None) -> ExportResult:
    """Write model.onnx, recipe.json, weights.safetensors and meta.json to `directory`, all or nothing.

    Fails, leaving nothing behind, when the ONNX output differs from torch by more than `config.atol`.
    """
    config = config or ExportConfig()
    target = Path(directory)
    _check_target(target, overwrite)  # before the minutes of export and verification, not after
    folded = fold_for_export(gm, config.feature_select)
    costs = count_costs(folded)
    with atomic_dir(target) as staging:
        write_onnx(folded, staging / "model.onnx", config)
        quantization = finish_quantized(staging / "model.onnx", config)
        sparse_kernels = finish_sparse(staging / "model.onnx", config)
        error = verify_onnx(staging / "model.onnx", folded, config)
        bf16 = bool(sparse_kernels and sparse_kernels["layers"]) and config.sparse_precision == "bf16"
        limit = verification_limit(config, quantization is not None, bf16)
        if not error <= limit:
            raise ExportError(f"exported ONNX differs from the torch model by {error:.3g} (limit {limit})")
        recipe.save(staging / "recipe.json")
        save_weights(gm, staging / "weights.safetensors")
        meta = {
            "base": recipe.base, "input_shape": [config.batch_size, *input_shape_of(gm)],
            "batch_size": config.batch_size, "dynamic_batch": config.dynamic_batch,
            "opset": config.opset, "feature_select": config.feature_select,
            "passes": [p.name for p in recipe.passes],
            **costs.as_dict(), "layers": layer_sparsity(folded), "verification_max_abs_diff": error,
            "verification_limit": limit, "versions": library_versions(), **serving_meta(gm),
            "onnx_sha256": file_sha256(staging / "model.onnx"),
            "weights_sha256": file_sha256(staging / "weights.safetensors"), "quantization": quantization,
            "sparse_kernels": sparse_kernels,
            **(extra_meta or {}),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        onnx.checker.check_model(str(staging / "model.onnx"))
        _check_target(target, overwrite)  # again: it may have appeared meanwhile
    return ExportResult(target, error, meta)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True to replace it")


__all__ = ["ARTIFACT_FILES", "ExportConfig", "ExportError", "ExportResult", "export_artifact",
           "file_sha256", "fold_for_export", "layer_sparsity", "verification_limit", "verify_onnx",
           "write_onnx"]
