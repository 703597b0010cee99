"""INT8 rows: static INT8 on digits-vit (dense and second-order-sparse), and the speed model's INT8
candidates, each timed on the engine that runs its format as INT8.

digits-vit: each sparsity's model (Fisher OBS masks, then the standard fine-tune) is quantized after
calibration on training images (`top1_oneshot`: post-training INT8), then fine-tuned
quantization-aware with the masks kept (`top1`). The structured and token rows get the same treatment
as INT8 twins (`int8_digits_twins`: each row's model rebuilt from its artifact). Every export of a
fine-tuned INT8 model is run on the held-out test images on each engine that runs its format and
compared with the fake-quantized torch model it came from (`verification`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, load_weights, replay, trace
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import FinetuneConfig, QuantConfig, QuantizePass, finetune, make_calibration
from vitsparse.runtime import create_engine, engine_status

from .accuracy import CALIBRATION_IMAGES, MODEL, digits_finetune_config, make_row
from .methods import METHODS, SpeedSetting, parse_speed_setting
from .schema import Row
from .speed import SpeedCandidate, artifact_slug

METHOD = "int8"
BASE = "obs-fisher"  # the second-order masks the sparse digits rows quantize
OBSERVER = "percentile"
QAT = FinetuneConfig(epochs=4, lr=1e-4, warmup_steps=5)  # a gentle lr: the calibrated ranges stay valid
FORMAT_ENGINES = {"qdq": ("onnxruntime", "openvino"), "operator": ("deepsparse",)}  # where each runs as INT8
# each export checked against the float model: verification key -> (format, engine)
VERIFICATIONS = {"qdq": ("qdq", "onnxruntime"), "qdq-openvino": ("qdq", "openvino"),
                 "operator": ("operator", "deepsparse")}
SPEED_CALIBRATION = 16  # images (random or --calibration-data) the speed model's ranges come from
# speed rows of these methods are also timed as INT8 (`int8_twins`): shapes in the precision the fastest
# dense engines run (the combined recipes in INT8 are the profile's frontier, quantized with their own
# settings)
TWINNED_METHODS = ("vtp", "head-channels", "token-drop")
TWIN_FORMATS = tuple(FORMAT_ENGINES)


@dataclass(frozen=True)
class Int8SpeedSetting:
    """An INT8 model to time: the masks under it (None: dense) and the format (hence the engine)."""

    masks: SpeedSetting | None
    format: str = "operator"

    def settings(self) -> dict[str, Any]:
        base = {"base": "dense"} if self.masks is None else {"base": "magnitude", **self.masks.settings()}
        return {**base, "format": self.format}


DEFAULT_SPEED = (Int8SpeedSetting(None, "qdq"), Int8SpeedSetting(None), Int8SpeedSetting(SpeedSetting(0.75)),
                 Int8SpeedSetting(SpeedSetting(0.9)), Int8SpeedSetting(SpeedSetting(0.75, "1x4")))


def _quantize(graph: torch.nn.Module, recipe: Recipe, calibration, config: QuantConfig | None = None
              ) -> PassManager:
    """A quantized copy of `graph` (the standard observer unless `config` says otherwise)."""
    manager = PassManager(copy.deepcopy(graph), recipe=copy.deepcopy(recipe))
    manager.run(QuantizePass(config or QuantConfig(observer=OBSERVER), calibration=calibration))
    return manager


def int8_twin(candidate: SpeedCandidate, form: str, calibration, config: QuantConfig | None = None,
              export: dict | None = None) -> SpeedCandidate:
    """`candidate`'s graph quantized (calibrated on `calibration`), timed on the engines that run `form`
    as INT8; its row is the candidate's with `int8: form` in its settings (a combined row also lists
    the pass)."""
    if form not in FORMAT_ENGINES:
        raise ValueError(f"unknown INT8 format {form!r}; choose from {', '.join(FORMAT_ENGINES)}")
    manager = _quantize(candidate.graph, candidate.recipe, calibration, config)
    settings = {**candidate.row.settings, "int8": form}
    if "passes" in settings and "int8" not in settings["passes"]:
        settings["passes"] = [*settings["passes"], "int8"]
    row = replace(candidate.row, settings=settings, speed=[], artifact=None)
    return SpeedCandidate(row, manager.graph_module, manager.recipe, engines=FORMAT_ENGINES[form],
                          export={"quant_format": form, **(export or {})})


def int8_twins(candidates: list[SpeedCandidate], formats: tuple[str, ...], calibration,
               export: dict | None = None) -> list[SpeedCandidate]:
    """Every structured and token candidate quantized in each of `formats` (`export`: their
    ExportConfig fields)."""
    return [int8_twin(c, form, calibration, export=export) for c in candidates
            if c.row.method in TWINNED_METHODS for form in formats]


def _logits(engine_name: str, directory: Path, images: torch.Tensor) -> np.ndarray:
    engine = create_engine(engine_name, directory / "model.onnx", batch_size=1)
    return np.concatenate([engine.run([image[None].numpy()])[0] for image in images])


def verify_formats(graph: torch.nn.Module, recipe: Recipe, images: torch.Tensor, artifacts: Path,
                   slug: str) -> dict[str, dict[str, float | str]]:
    """Each format's export of the fake-quantized `graph` run on every engine that runs it as INT8 over
    `images`, against `graph`'s own logits."""
    with torch.no_grad():
        reference = graph.eval()(images).numpy()
    checks, exported = {}, {}
    for key, (form, engine_name) in VERIFICATIONS.items():
        if not engine_status(engine_name).available:
            continue
        if form not in exported:
            exported[form] = export_artifact(graph, recipe, artifacts / f"{slug}-{form}",
                                             ExportConfig(quant_format=form), overwrite=True).directory
        logits = _logits(engine_name, exported[form], images)
        checks[key] = {"engine": engine_name, "images": len(images),
                        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
                        "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1)))}
    return checks


@dataclass
class _Quantized:
    """A model in INT8 on digits-vit: its recipe, the fake-quantized model after QAT, its top-1 before
    and after QAT."""

    recipe: Recipe
    tuned: torch.nn.Module
    post_training: float
    top1: float
    calibration_samples: int


def _quantize_and_tune(graph: torch.nn.Module, recipe: Recipe, dense: torch.nn.Module, loaders,
                       calibration) -> _Quantized:
    """`graph` calibrated to INT8, then fine-tuned quantization-aware (distilled from `dense`)."""
    quantized = _quantize(graph, recipe, calibration)
    post_training = evaluate(quantized.graph_module, loaders.test).top1
    tuned = finetune(quantized.graph_module, loaders.train, loaders.val, QAT, teacher=dense,
                     progress=False).model
    return _Quantized(quantized.recipe, tuned, post_training, evaluate(tuned, loaders.test).top1,
                      quantized.recipe.passes[-1].stats["calibration_samples"])


def _int8_row(method: str, settings: dict, result: _Quantized, images: torch.Tensor, artifacts: Path) -> Row:
    """The INT8 row of `result`, each export format checked against the fake-quantized model."""
    row = make_row(method, settings, result.tuned, result.top1, result.post_training)
    row.calibration_samples = result.calibration_samples
    slug = artifact_slug(row)
    row.verification = verify_formats(result.tuned, result.recipe, images, artifacts, slug)
    row.artifact = str(artifacts / f"{slug}-qdq")
    return row


def int8_digits_rows(sparsities: tuple[float, ...], epochs: int, artifacts: Path) -> list[Row]:
    """digits-vit at each sparsity: INT8 top-1 after calibration and after quantization-aware training."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    calibration = make_calibration(loaders.train, CALIBRATION_IMAGES)
    images = torch.cat([x for x, _ in loaders.test])
    base = {"model": MODEL, "kwargs": {}, "pretrained": True}
    rows = []
    for sparsity in sparsities:
        manager = PassManager(trace(dense), recipe=Recipe(base=base))
        graph = manager.graph_module
        if sparsity:
            manager.run(METHODS[BASE].make_pass(sparsity, calibration=calibration,
                                                samples=CALIBRATION_IMAGES))
            graph = finetune(manager.graph_module, loaders.train, loaders.val, digits_finetune_config(epochs),
                             teacher=dense, progress=False).model
        result = _quantize_and_tune(graph, manager.recipe, dense, loaders, calibration)
        settings = {"base": BASE if sparsity else "dense", "sparsity": sparsity, "pattern": "unstructured",
                    "observer": OBSERVER}
        rows.append(_int8_row(METHOD, settings, result, images, artifacts))
    return rows


def is_twinned_digits_row(row: Row) -> bool:
    """A digits-vit row whose model also runs in INT8: each structured and token method, in the form
    its speed rows are timed in (the full head-channel method, a static keep rate)."""
    settings = row.settings
    return (row.model == MODEL and row.method in TWINNED_METHODS and row.artifact is not None
            and settings.get("variant", "full") == "full" and settings.get("mode", "fixed") == "fixed")


def int8_digits_twins(rows: list[Row], artifacts: Path, progress: bool = True) -> list[Row]:
    """Each twinned digits-vit row's model, rebuilt from its artifact (recipe replayed, weights loaded),
    in INT8 after calibration and after quantization-aware training; its settings gain `int8: qat`."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    calibration = make_calibration(loaders.train, CALIBRATION_IMAGES)
    images = torch.cat([x for x, _ in loaders.test])
    twins = []
    for row in tqdm([r for r in rows if is_twinned_digits_row(r)], desc="digits-vit int8 twins", unit="model",
                    disable=not progress):
        directory = Path(row.artifact)
        recipe = Recipe.load(directory / "recipe.json")
        graph = load_weights(replay(build_model(MODEL), recipe), directory / "weights.safetensors")
        result = _quantize_and_tune(graph, recipe, dense, loaders, calibration)
        twins.append(_int8_row(row.method, {**row.settings, "int8": "qat"}, result, images, artifacts))
    return twins


def int8_speed_candidates(model: torch.nn.Module, settings: tuple[Int8SpeedSetting, ...], calibration,
                          base: dict, make_row_for) -> list[SpeedCandidate]:
    """The speed model under each setting's masks, quantized, to be timed on its format's engines only."""
    candidates = []
    for setting in settings:
        manager = PassManager(trace(model), recipe=Recipe(base=base))
        if setting.masks is not None:
            manager.run(METHODS["magnitude"].make_pass(setting.masks.sparsity, setting.masks.pattern))
        manager.run(QuantizePass(QuantConfig(observer=OBSERVER), calibration=calibration))
        row = make_row_for(METHOD, setting.settings(), manager)
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe,
                                         engines=FORMAT_ENGINES[setting.format],
                                         export={"quant_format": setting.format}))
    return candidates


def parse_int8_speed_setting(text: str) -> Int8SpeedSetting:
    """'dense' or 'dense@qdq', '0.9', '0.75@1x4' (the operator format on DeepSparse unless '@qdq' ends it)."""
    text = text.strip()
    form = "operator"
    if text.endswith("@qdq") or text.endswith("@operator"):
        text, _, form = text.rpartition("@")
    masks = None if text == "dense" else parse_speed_setting(text)
    return Int8SpeedSetting(masks, form)
