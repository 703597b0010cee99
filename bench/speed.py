"""Speed rows: export each pruned model, then time dense PyTorch and every CPU engine side by side."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from vitsparse.compiler import (
    ExportConfig,
    ExportError,
    Recipe,
    SelectFeatures,
    export_artifact,
    fold_for_export,
)
from vitsparse.compiler.sparse_onnx import BLOCK, block_sparsity
from vitsparse.compiler.trace import example_input
from vitsparse.runtime import check_engine_spec, compare_side_by_side, create_engine, parse_engine_spec
from vitsparse.runtime.kernel_crossover import default_min_sparsity

from .schema import Row, SpeedEntry

TORCH = "torch"
INT8 = "int8"
WARMUP_SECONDS = 0.5  # before each timed block, at most
# the sparse engines: never counted as a dense alternative. openvino-sparse runs vitsparse's kernels, so
# a row without sparse layers would only repeat its openvino column there, and is not timed on it
KERNEL_ENGINE = "openvino-sparse"
SPARSE_ENGINES = ("deepsparse", KERNEL_ENGINE)
ORT_ENGINE = "onnxruntime"  # dense INT8 (QDQ) here is the alternative the INT8 table is measured against
# how each engine wants a graph written when the default ONNX form does not suit it: DeepSparse has
# no Gather, so VTP's feature selections go to it as one-hot products (which it runs sparse); OpenVINO
# gets one Gather on the last axis (the default's two transposes cost it more than the gather)
ENGINE_EXPORT: dict[str, dict] = {"deepsparse": {"feature_select": "matmul"},
                                  "openvino": {"feature_select": "gather-last"},
                                  KERNEL_ENGINE: {"feature_select": "gather-last", "sparse_kernels": True}}
# the speed model's export check where a random-weight model on noise images parts from torch without a
# bug, over the export's defaults (digits-vit's trained models export within them):
# - INT8 (twins and the combined frontier): torch's and ONNX's rounding (x·(1/s) against x/s) flip a few
#   codes, which moved a logit by up to 0.12 (VTP 40 % in the operator format at batch 16) and 0.16
#   (tokens dropped before block 1, INT8 patch embedding) within ±1.8;
# - token dropping in float: some tokens score within float rounding of each other, so torch and ONNX
#   keep different ones for that image (combined recipe at batch 16: one image of 16 parted by 0.007,
#   the other 15 by 1e-6, against the 1e-3 default)
SPEED_MODEL_ATOL = 0.25
# models compiled at once besides the baselines: at batch 16 a deit_small takes about 0.9 GiB on
# DeepSparse, ONNX Runtime, OpenVINO and PyTorch together
MODELS_PER_GROUP = 8


@dataclass
class SpeedCandidate:
    """A row to time and the pruned graph (with its recipe) that produces it; `engines` limits where it
    is timed (an INT8 format runs as INT8 on one engine) and `export` adds ExportConfig settings."""

    row: Row
    graph: fx.GraphModule
    recipe: Recipe
    engines: tuple[str, ...] | None = None
    export: dict = field(default_factory=dict)

    def timed_on(self, engines: tuple[str, ...]) -> list[str]:
        """The engine columns (names, 'openvino:bf16' and the like) this candidate is timed in."""
        return [e for e in engines if (self.engines is None or engine_name(e) in self.engines)
                and (engine_name(e) != KERNEL_ENGINE or has_sparse_layers(self.graph))]


def kernel_thresholds() -> dict[str, float]:
    """The share of zeros from which the sparse-kernel export turns a masked linear into a kernel node on
    this CPU, INT8 (all-zero 1×4 blocks) and float (zeros), as prune-and-bench exports them."""
    return {"int8": default_min_sparsity("int8"), "f32": default_min_sparsity("f32")}


def has_sparse_layers(graph: torch.nn.Module) -> bool:
    """Whether the sparse-kernel export would rewrite a layer of `graph`: a masked linear with at least
    the export's default share of zeros for its precision on this CPU, counted as the export counts
    them (INT8: all-zero 1×4 blocks)."""
    thresholds = kernel_thresholds()
    for module in graph.modules():
        mask = getattr(module, "weight_mask", None)
        if mask is None or mask.dim() != 2:  # the export rewrites MatMuls, not convolutions
            continue
        quantized = hasattr(module, "act_scale")
        zeros = block_sparsity(mask.cpu().numpy(), BLOCK) if quantized else module.sparsity()
        if zeros >= thresholds["int8" if quantized else "f32"]:
            return True
    return False


def engine_name(column: str) -> str:
    """The engine behind a speed column: 'openvino:bf16' -> 'openvino'."""
    return parse_engine_spec(column)[0]


@dataclass(frozen=True)
class TimingPlan:
    batch_sizes: tuple[int, ...]
    engines: tuple[str, ...]
    rounds: int
    seconds_per_block: float
    num_cores: int | None
    models_per_group: int = MODELS_PER_GROUP

    @property
    def warmup_seconds(self) -> float:
        """Each block's warm-up: half a second, or the block's own length where that is shorter (a quick
        run's blocks would otherwise spend most of their time warming up)."""
        return min(WARMUP_SECONDS, self.seconds_per_block)


def artifact_slug(row: Row, suffix: str = "") -> str:
    """A folder name for a row's artifact: model, method, settings values (':' spelled 'of', a list's
    items joined by '_'), suffix."""
    settings = "-".join(_slug_value(v) for _, v in sorted(row.settings.items()))
    return "-".join(p for p in (row.model, row.method, settings, suffix) if p)


def _slug_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(_slug_value(v) for v in value)
    return str(value).replace(":", "of")


def _torch_runner(graph: fx.GraphModule, batch: int) -> Callable[[], object]:
    folded = fold_for_export(graph)
    sample = example_input(folded, batch)

    def run() -> object:
        with torch.inference_mode():
            return folded(sample)

    return run


def _engine_runner(column: str, onnx_path: Path, batch: int, num_cores: int | None, graph: fx.GraphModule):
    """The engine of a column, its float layers in the column's precision (f32 unless it names one)."""
    name, precision = parse_engine_spec(column)
    engine = create_engine(name, onnx_path, batch_size=batch, num_cores=num_cores,
                           precision=precision or "f32")
    inputs = [example_input(graph, batch).numpy()]
    return engine, (lambda: engine.run(inputs))


def _engine_onnx(cand: SpeedCandidate, engine: str, batch: int, default: Path, artifacts: Path) -> Path:
    """The ONNX file `engine` runs: the default export, or one written in the engine's own form when
    the graph holds something that form changes (a feature selection)."""
    overrides = ENGINE_EXPORT.get(engine_name(engine))
    changes = any(isinstance(m, SelectFeatures) for m in cand.graph.modules()) or (
        overrides and overrides.get("sparse_kernels") and has_sparse_layers(cand.graph))
    if not overrides or not changes:
        return default
    config = ExportConfig(batch_size=batch, **{**cand.export, **overrides})
    return _export(cand, artifacts / artifact_slug(cand.row, f"b{batch}-{engine}"), config) / "model.onnx"


def _export(cand: SpeedCandidate, target: Path, config: ExportConfig) -> Path:
    """The candidate exported to `target`; a failed export names the candidate and batch size."""
    try:
        return export_artifact(cand.graph, cand.recipe, target, config, overwrite=True).directory
    except ExportError as err:
        raise ExportError(f"{cand.row.label()} at batch {config.batch_size}: {err}") from err


def is_dense_int8(row: Row) -> bool:
    """The dense model as a QDQ INT8 file: what ONNX Runtime and OpenVINO run in INT8."""
    return row.method == INT8 and row.settings.get("base") == "dense" and row.settings.get("format") == "qdq"


def is_baseline(row: Row) -> bool:
    """A row every other is compared with: the dense model, in float or as a QDQ INT8 file."""
    return row.method == "dense" or is_dense_int8(row)


def timing_groups(candidates: list[SpeedCandidate], models_per_group: int) -> list[list[int]]:
    """Candidate indices timed together: every group holds the baselines (the dense model first) and at
    most `models_per_group` others, so the engines compiled at once fit in memory (every model holds
    one compiled engine per engine kind) while every ratio is still measured side by side."""
    baselines = _baseline_indices(candidates)
    others = [i for i in range(len(candidates)) if i not in baselines]
    chunks = [others[k:k + models_per_group] for k in range(0, len(others), models_per_group)]
    return [baselines + chunk for chunk in chunks or [[]]]


def _baseline_indices(candidates: list[SpeedCandidate]) -> list[int]:
    return [i for i, c in enumerate(candidates) if i == 0 or is_baseline(c.row)]


def _export_for_batch(cand: SpeedCandidate, batch: int, plan: TimingPlan, artifacts: Path) -> Path:
    """The candidate's ONNX file at `batch` (the first batch size's becomes the row's artifact)."""
    directory = _export(cand, artifacts / artifact_slug(cand.row, f"b{batch}"),
                        ExportConfig(batch_size=batch, **cand.export))
    if batch == plan.batch_sizes[0]:
        cand.row.artifact = str(directory)
    return directory / "model.onnx"


def _runners_for_group(candidates: list[SpeedCandidate], indices: list[int], batch: int, plan: TimingPlan,
                       artifacts: Path, exported: dict[int, Path], log: Callable[[str], None] | None = None
                       ) -> tuple[dict[tuple[int, str], Callable[[], object]], dict[str, dict]]:
    """One runner per (candidate, engine) of the group, and what each engine reports of its compiled
    graph by (candidate, engine); each candidate is exported once per batch size."""
    runners, fractions, shares = {}, {}, {}
    for index in indices:
        cand = candidates[index]
        if log is not None:
            log(f"      batch {batch}: exporting and compiling {cand.row.label()}")
        if index not in exported:
            exported[index] = _export_for_batch(cand, batch, plan, artifacts)
        engines = cand.timed_on(plan.engines)
        if TORCH in engines:
            runners[(index, TORCH)] = _torch_runner(cand.graph, batch)
        for name in (e for e in engines if e != TORCH):
            onnx_path = _engine_onnx(cand, name, batch, exported[index], artifacts)
            engine, runner = _engine_runner(name, onnx_path, batch, plan.num_cores, cand.graph)
            runners[(index, name)] = runner
            fractions[(index, name)] = engine.fraction_of_supported_ops
            shares[(index, name)] = engine.int8_mac_share
    return runners, {"fraction_of_supported_ops": fractions, "int8_mac_share": shares}


def _time_group(candidates: list[SpeedCandidate], indices: list[int], batch: int, plan: TimingPlan,
                artifacts: Path, exported: dict[int, Path], bar: tqdm, log: Callable[[str], None] | None
                ) -> dict[int, list[SpeedEntry]]:
    """Compile the group's engines, time them in alternating rounds, free them; entries by candidate."""
    bar.set_description(f"compiling for batch {batch}")
    runners, reported = _runners_for_group(candidates, indices, batch, plan, artifacts, exported, log)
    labels = {key: f"{candidates[key[0]].row.label()} on {key[1]}" for key in runners}
    bar.total += plan.rounds * len(runners)
    bar.set_description(f"timing batch {batch}")
    count = len(runners)
    blocks = iter(range(1, plan.rounds * count + 1))

    def on_block(_: str) -> None:
        bar.update()
        block = next(blocks)
        if log is not None and block % count == 0:
            log(f"      batch {batch}: round {block // count}/{plan.rounds} of {count} runners timed")

    timed = compare_side_by_side({labels[k]: fn for k, fn in runners.items()}, batch_size=batch,
                                 rounds=plan.rounds, seconds_per_block=plan.seconds_per_block,
                                 warmup=plan.warmup_seconds, on_block=on_block)
    del runners
    gc.collect()  # an engine in a reference cycle would otherwise hold its memory into the next group
    entries: dict[int, list[SpeedEntry]] = {index: [] for index in indices}
    for (index, engine), label in labels.items():
        result = timed[label]
        entries[index].append(SpeedEntry(engine=engine, batch=batch, items_per_sec=result.items_per_sec,
                                         latency_ms=dict(result.latency_ms),
                                         **{key: values.get((index, engine))
                                            for key, values in reported.items()}))
    return entries


def measure_speed(candidates: list[SpeedCandidate], plan: TimingPlan, artifacts: Path,
                  progress: bool = False, on_group: Callable[[str], None] | None = None,
                  log: Callable[[str], None] | None = None) -> None:
    """Fill each candidate row's `speed`; the first candidate must be the dense baseline.

    Candidates are timed in groups (`timing_groups`), each beside its own timing of the baselines;
    a row's speed-ups are over the baselines timed with it, the baseline rows keep the first group's.
    With `progress`, a bar in a terminal counts the timed blocks (minutes on a ViT with every engine);
    without, `log` hears of each model compiled and each round timed. `on_group` hears when a group
    is done at a batch size.
    """
    for column in plan.engines:
        if column != TORCH:
            check_engine_spec(column)  # a ValueError saying why the engine or precision cannot run here
    if plan.num_cores:
        torch.set_num_threads(plan.num_cores)
    groups, baselines = timing_groups(candidates, plan.models_per_group), _baseline_indices(candidates)
    log = None if progress else log
    with tqdm(total=0, unit="block", disable=None if progress else True) as bar:
        for batch in plan.batch_sizes:
            _time_batch(candidates, groups, baselines, batch, plan, artifacts, bar, log, on_group)


def _time_batch(candidates: list[SpeedCandidate], groups: list[list[int]], baselines: list[int], batch: int,
                plan: TimingPlan, artifacts: Path, bar: tqdm, log: Callable[[str], None] | None,
                on_group: Callable[[str], None] | None) -> None:
    """One batch size: every group timed beside its own baselines; fills the candidates' speed."""
    exported: dict[int, Path] = {}
    for number, indices in enumerate(groups):
        entries = _time_group(candidates, indices, batch, plan, artifacts, exported, bar, log)
        if on_group is not None:
            on_group(f"timing batch {batch}, group {number + 1}/{len(groups)} ({len(indices)} models)")
        timed_with = [replace(candidates[i].row, speed=entries[i]) for i in baselines]
        kept = indices if number == 0 else [i for i in indices if i not in baselines]
        _fill_speedups(timed_with, [e for i in kept for e in entries[i]])
        for index in kept:
            candidates[index].row.speed.extend(entries[index])


def dense_alternative(row: Row, entry: SpeedEntry) -> str | None:
    """What a user could run instead of vitsparse, named ('openvino int8'), or None: the dense model on
    any engine but the sparse ones, in float or as a QDQ INT8 file."""
    if engine_name(entry.engine) in SPARSE_ENGINES:
        return None
    if row.method == "dense":
        return f"{entry.engine} fp32" if ":" not in entry.engine else entry.engine.replace(":", " ")
    if is_dense_int8(row):
        return f"{engine_name(entry.engine)} int8"
    return None


def best_dense_alternatives(rows: list[Row]) -> dict[int, tuple[str, float]]:
    """Per batch size: the fastest dense alternative timed (by median latency) and that latency."""
    best: dict[int, tuple[str, float]] = {}
    for row in rows:
        for entry in row.speed:
            name = dense_alternative(row, entry)
            if name and (entry.batch not in best or entry.latency_ms["p50"] < best[entry.batch][1]):
                best[entry.batch] = (name, entry.latency_ms["p50"])
    return best


def dense_engine(column: str) -> str:
    """The column a dense model is timed in for `column`: openvino's for openvino-sparse (a file without
    sparse layers runs the same there, and is not timed on it), else the column itself."""
    return "openvino" + column[len(KERNEL_ENGINE):] if engine_name(column) == KERNEL_ENGINE else column


def _fill_speedups(baselines: list[Row], entries: list[SpeedEntry]) -> None:
    """Speed-ups of `entries` over the baseline rows timed with them (`baselines[0]`: the dense model), as
    ratios of median latency at the same batch size: on a shared, noisy machine the median of hundreds
    of calls is steadier than the mean that items/sec reflects."""
    dense = {(s.engine, s.batch): s.latency_ms["p50"] for s in baselines[0].speed}
    best = best_dense_alternatives(baselines)
    ort_int8 = {s.batch: s.latency_ms["p50"] for row in baselines if is_dense_int8(row) for s in row.speed
                if s.engine == ORT_ENGINE}
    for entry in entries:
        torch_dense = dense.get((TORCH, entry.batch))
        same_engine = dense.get((dense_engine(entry.engine), entry.batch))
        median = entry.latency_ms["p50"]
        entry.speedup_vs_dense_torch = torch_dense / median if torch_dense else None
        entry.speedup_vs_dense_same_engine = same_engine / median if same_engine else None
        if entry.batch in best:
            entry.best_dense, best_latency = best[entry.batch]
            entry.speedup_vs_best_dense = best_latency / median
        if entry.batch in ort_int8:
            entry.speedup_vs_ort_int8 = ort_int8[entry.batch] / median
