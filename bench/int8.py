"""INT8 rows: static INT8 on digits-vit (dense and second-order-sparse), and the speed model's INT8
candidates, each timed on the engine that runs its format as INT8.

digits-vit: each sparsity's model (Fisher OBS masks, then the standard fine-tune) is quantized after
calibration on training images (`top1_oneshot`: post-training INT8), then fine-tuned
quantization-aware with the masks kept (`top1`). A setting ending in `+int8` (`vtp=0.4+int8`) gets
the same treatment as an INT8 twin (`int8_digits_twin`: its row's model rebuilt from its artifact)
and, on the speed model, its graph quantized in each timed format (`with_speed_twins`). Every export of a
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

from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, load_weights, replay, trace
from vitsparse.models import evaluate
from vitsparse.pruners import FinetuneConfig, QuantConfig, QuantizePass, finetune, make_calibration
from vitsparse.runtime import create_engine, engine_status

from .accuracy import CALIBRATION_IMAGES, digits_finetune_config, make_row
from .methods import METHODS, SpeedSetting, parse_speed_setting
from .report import int8_speed_table, int8_table
from .schema import Row
from .spec import DigitsContext, MethodSpec, SpeedContext
from .speed import SpeedCandidate, artifact_slug

METHOD = "int8"
BASE = "obs-fisher"  # the second-order masks the sparse digits rows quantize
OBSERVER = "percentile"
QAT = FinetuneConfig(epochs=4, lr=1e-4, warmup_steps=5)  # a gentle lr: the calibrated ranges stay valid
# where each format runs as INT8
FORMAT_ENGINES = {"qdq": ("onnxruntime", "openvino", "openvino-sparse"), "operator": ("deepsparse",)}
# each export checked against the float model: verification key -> (export settings, engine)
VERIFICATIONS = {"qdq": ({"quant_format": "qdq"}, "onnxruntime"),
                 "qdq-openvino": ({"quant_format": "qdq"}, "openvino"),
                 "operator": ({"quant_format": "operator"}, "deepsparse"),
                 "sparse-kernels": ({"quant_format": "qdq", "sparse_kernels": True}, "openvino-sparse")}
SPEED_CALIBRATION = 16  # images (random or --calibration-data) the speed model's ranges come from


@dataclass(frozen=True)
class Int8SpeedSetting:
    """An INT8 model to time: the masks under it (None: dense) and the format (hence the engine)."""

    masks: SpeedSetting | None
    format: str = "operator"

    def settings(self) -> dict[str, Any]:
        base = {"base": "dense"} if self.masks is None else {"base": "magnitude", **self.masks.settings()}
        return {**base, "format": self.format}


@dataclass(frozen=True)
class Int8Setting:
    """The masks under INT8 (None: the dense model)."""

    masks: SpeedSetting | None


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
    for key, (settings, engine_name) in VERIFICATIONS.items():
        if not engine_status(engine_name).available:
            continue
        export = tuple(sorted(settings.items()))
        if export not in exported:
            name = "-".join(str(value) if value is not True else option for option, value in export)
            exported[export] = export_artifact(graph, recipe, artifacts / f"{slug}-{name}",
                                               ExportConfig(**settings), overwrite=True).directory
        logits = _logits(engine_name, exported[export], images)
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


def _int8_row(method: str, settings: dict, result: _Quantized, ctx: DigitsContext) -> Row:
    """The INT8 row of `result`, each export format checked against the fake-quantized model."""
    row = make_row(method, settings, result.tuned, result.top1, result.post_training, model=ctx.model)
    artifacts = ctx.artifacts
    row.calibration_samples = result.calibration_samples
    slug = artifact_slug(row)
    row.verification = verify_formats(result.tuned, result.recipe, ctx.test_images, artifacts, slug)
    row.artifact = str(artifacts / f"{slug}-qdq")
    return row


def int8_digits_row(setting: Int8Setting, ctx: DigitsContext) -> Row:
    """digits-vit under `setting`'s masks (Fisher OBS, then the standard fine-tune), in INT8 after
    calibration and after quantization-aware training."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    calibration = make_calibration(ctx.loaders.train, CALIBRATION_IMAGES)
    manager = PassManager(trace(ctx.dense), recipe=Recipe(base=ctx.base))
    graph, masks = manager.graph_module, setting.masks
    if masks is not None:
        manager.run(METHODS[BASE].make_pass(masks.sparsity, masks.pattern, calibration=calibration,
                                            samples=calibration.num_samples))
        graph = finetune(manager.graph_module, ctx.loaders.train, ctx.loaders.val,
                         digits_finetune_config(ctx.epochs), teacher=ctx.dense, progress=False).model
    result = _quantize_and_tune(graph, manager.recipe, ctx.dense, ctx.loaders, calibration)
    settings = ({"base": "dense", "sparsity": 0.0, "pattern": "unstructured"} if masks is None
                else {"base": BASE, **masks.settings()})
    return _int8_row(METHOD, {**settings, "observer": OBSERVER}, result, ctx)


def int8_digits_twin(row: Row, ctx: DigitsContext) -> Row:
    """`row`'s model, rebuilt from its artifact (recipe replayed on the dense model, weights loaded), in
    INT8 after calibration and after quantization-aware training; its settings gain `int8: qat`."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    calibration = make_calibration(ctx.loaders.train, CALIBRATION_IMAGES)
    directory = Path(row.artifact)
    recipe = Recipe.load(directory / "recipe.json")
    graph = load_weights(replay(copy.deepcopy(ctx.dense), recipe), directory / "weights.safetensors")
    result = _quantize_and_tune(graph, recipe, ctx.dense, ctx.loaders, calibration)
    return _int8_row(row.method, {**row.settings, "int8": "qat"}, result, ctx)


def with_digits_twin(row: Row, int8: bool, ctx: DigitsContext) -> list[Row]:
    """`row`, and with `int8` its INT8 twin."""
    return [row, int8_digits_twin(row, ctx)] if int8 else [row]


def with_speed_twins(candidate: SpeedCandidate, int8: bool, ctx: SpeedContext,
                     config: QuantConfig | None = None) -> list[SpeedCandidate]:
    """`candidate`, and with `int8` its INT8 twin in every format whose engine is timed."""
    twins = [int8_twin(candidate, form, ctx.int8_calibration, config, export=ctx.export)
             for form in ctx.int8_formats] if int8 else []
    return [candidate, *twins]


def int8_speed_candidate(ctx: SpeedContext, masks: SpeedSetting | None, form: str) -> SpeedCandidate:
    """The speed model under `masks` (magnitude; None: dense), calibrated to INT8, timed only on the
    engines that run `form` as INT8."""
    manager = PassManager(trace(ctx.model), recipe=Recipe(base=ctx.base))
    if masks is not None:
        manager.run(METHODS["magnitude"].make_pass(masks.sparsity, masks.pattern))
    manager.run(QuantizePass(QuantConfig(observer=OBSERVER), calibration=ctx.int8_calibration))
    return ctx.candidate(METHOD, Int8SpeedSetting(masks, form).settings(), manager,
                         engines=FORMAT_ENGINES[form], export={"quant_format": form})


def _is_baseline(setting: Int8Setting, form: str) -> bool:
    """Whether the setting's model in `form` is the workflow's dense QDQ baseline (workflow._baselines)."""
    return setting.masks is None and form == "qdq"


class Int8Spec(MethodSpec):
    name = METHOD
    example = "0.75@1x4"
    summary = "dense or SPARSITY[@1xK]"

    def parse(self, text: str) -> Int8Setting:
        if text.strip() == "dense":
            return Int8Setting(None)
        try:
            masks = parse_speed_setting(text)
        except ValueError as err:
            raise self.bad_setting(text, str(err)) from None
        return Int8Setting(masks if masks.sparsity else None)

    def digits_rows(self, setting: Int8Setting, ctx: DigitsContext) -> list[Row]:
        return [int8_digits_row(setting, ctx)]

    def speed_candidates(self, setting: Int8Setting, ctx: SpeedContext) -> list[SpeedCandidate]:
        """The speed model under the setting's magnitude masks, quantized, in every timed format (dense
        QDQ is the workflow's baseline already)."""
        return [int8_speed_candidate(ctx, setting.masks, form) for form in ctx.int8_formats
                if not _is_baseline(setting, form)]

    def shared_baselines(self, setting: Int8Setting, ctx: SpeedContext) -> list[str]:
        """`int8=dense`'s QDQ file is the workflow's dense INT8 baseline."""
        return [Row(ctx.model_name, METHOD, Int8SpeedSetting(setting.masks, form).settings()).label()
                for form in ctx.int8_formats if _is_baseline(setting, form)]

    def report_section(self, rows: list[Row], meta: dict) -> str:
        parts = []
        table = int8_table(rows)
        if table:
            parts.append("## Static INT8 on digits-vit\n\nPer-channel symmetric INT8 weights, UINT8 "
                         "activations calibrated on 256 training images (percentile observer); masked rows "
                         "quantize Fisher OBS masks after the standard fine-tune, twins (`int8: qat`) the "
                         "fine-tuned model of their float row (rebuilt from its artifact). Post-training is "
                         "the calibrated model, QAT after 4 epochs of quantization-aware fine-tuning with "
                         "the masks kept. Each export of the QAT model ran on every engine that runs its "
                         "format over the test images, compared with the fake-quantized torch model.\n\n"
                         + table)
        speed = int8_speed_table(rows)
        if speed:
            parts.append("## INT8 speed\n\nEvery model timed as INT8. The operator format runs on "
                         "DeepSparse, QDQ on ONNX Runtime and OpenVINO (DeepSparse and ONNX Runtime refuse "
                         "each other's form); median latency, this run. MACs in INT8: the share of the "
                         "file's MatMul, Gemm and Conv MACs that OpenVINO's executed graph runs in u8/i8 "
                         "(on openvino-sparse, a sparse-kernel node counts as the products it replaces, "
                         "in INT8 when its kernel is)."
                         "\n\n" + speed)
        return "\n\n".join(parts)


SPEC = Int8Spec()
