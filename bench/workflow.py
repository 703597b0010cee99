"""The prune-and-bench workflow: a loop over a profile's (method, setting) entries, accuracy on the
built-in digits-vit, then speed on a real-size ViT, then the report.

Each method is a spec in `registry.SPECS`; this module knows none of them by name.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.compiler.export import library_versions
from vitsparse.compiler.trace import example_input
from vitsparse.models import build_model, digits_loaders, imagefolder_loader
from vitsparse.models.pretrained import cached_weights_path
from vitsparse.pruners import make_calibration
from vitsparse.runtime import ENGINES as RUNTIME_ENGINES
from vitsparse.runtime import RuntimeInputError, check_engine_spec, engine_status, engine_versions
from vitsparse.runtime.kernel_crossover import cpu_flags, cpu_model

from .accuracy import MODEL as DIGITS
from .accuracy import dense_digits_row
from .int8 import FORMAT_ENGINES, int8_speed_candidate
from .int8 import SPEED_CALIBRATION as INT8_CALIBRATION
from .profiles import FULL, Profile, get_profile
from .progress import RunProgress, clock
from .registry import get_spec
from .report import is_int8_row, write_report
from .schema import Row
from .spec import INT8_SUFFIX, DigitsContext, Entry, MethodSpec, SpeedContext
from .speed import (
    KERNEL_ENGINE,
    SPEED_MODEL_ATOL,
    TORCH,
    SpeedCandidate,
    TimingPlan,
    engine_name,
    kernel_thresholds,
    measure_speed,
    timing_groups,
)

ENGINES = (*RUNTIME_ENGINES, TORCH)  # the CPU engines plus dense PyTorch as the baseline
# timed beside the f32 columns where the CPU can run them: OpenVINO with its float parts in bf16, which
# makes dense INT8 faster on CPUs with BF16, and the sparse kernels beside it
PRECISION_COLUMNS = ("openvino:bf16", f"{KERNEL_ENGINE}:bf16")
EXTRA_ENGINES = (KERNEL_ENGINE,)  # built by vitsparse itself: timed by the full profile or when named
SPEED_MODEL_SEED = 0  # the speed model's random weights: one model across runs, whatever ran before
NONE = "none"  # `--only none`, `-e none`: an empty list


def available_engines(extra_columns: bool = True) -> tuple[str, ...]:
    """The engines that can run here (DeepSparse needs Python < 3.12), plus PyTorch; with `extra_columns`
    also vitsparse's kernels where they are built and OpenVINO in bf16 where the CPU has bf16."""
    columns = [e for e in RUNTIME_ENGINES if engine_status(e).available
               and (extra_columns or e not in EXTRA_ENGINES)]
    columns += [c for c in PRECISION_COLUMNS if extra_columns and _runs_here(c)]
    return (*columns, TORCH)


def engines_left_out() -> dict[str, str]:
    """Each CPU engine that cannot run here, with the reason (DeepSparse on Python >= 3.12, say)."""
    return {e: status.reason for e in RUNTIME_ENGINES if not (status := engine_status(e)).available}


def _runs_here(column: str) -> bool:
    try:
        check_engine_spec(column)
    except RuntimeInputError:
        return False
    return True


@dataclass
class BenchOptions:
    profile: str = "default"
    only: tuple[str, ...] = ()  # METHOD (the profile's entries of it) or METHOD=SETTING[,SETTING]; replaces
    skip: tuple[str, ...] = ()  # methods left out
    model: str = "deit_small_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    calibration_data: Path | None = None  # ImageFolder for the speed model's solvers; random images otherwise
    batch_sizes: tuple[int, ...] | None = None  # the profile's unless given
    engines: tuple[str, ...] | None = None  # every engine here unless given; () times nothing
    seconds_per_block: float | None = None
    rounds: int | None = None
    num_cores: int | None = None
    epochs: int | None = None  # every digits-vit fine-tune, the long ones included
    seeds: int | None = None  # seeds per digits-vit row, every method
    output_dir: Path = field(default_factory=lambda: Path("bench/results"))
    accuracy: bool = True  # the digits-vit rows
    quiet: bool = False

    def __post_init__(self) -> None:
        for column in self.engines or ():
            if column != TORCH:
                check_engine_spec(column)  # unknown, not installed, or a precision this CPU lacks
        for name, value in (("epochs", self.epochs), ("seeds", self.seeds), ("rounds", self.rounds)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be >= 1, got {value}")
        if any(b < 1 for b in self.batch_sizes or ()):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")


@dataclass(frozen=True)
class PlannedEntry:
    """An entry with its spec and parsed setting."""

    entry: Entry
    spec: MethodSpec
    setting: Any


def resolve_entries(profile: Profile, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> list[Entry]:
    """The profile's entries, or those `only` names (METHOD: the profile's, else the full profile's, entries
    of it; METHOD=S1,S2: those settings, on digits-vit and timed), less the methods in `skip`."""
    for name in skip:
        get_spec(name)
    if not only:
        entries = list(profile.entries)
    else:
        entries = []
        for item in only:
            if item == NONE:
                continue
            method, assigned, settings = item.partition("=")
            get_spec(method)
            if assigned:
                entries += [Entry(method, s.strip()) for s in settings.split(",") if s.strip()]
            else:
                entries += ([e for e in profile.entries if e.method == method]
                            or [e for e in FULL.entries if e.method == method])
    return list(dict.fromkeys(e for e in entries if e.method not in skip))


def plan_entries(entries: list[Entry]) -> list[PlannedEntry]:
    """Each entry parsed by its spec now, so a bad setting fails before any work."""
    return [PlannedEntry(e, spec := get_spec(e.method), spec.parse(e.setting)) for e in entries]


def left_out(entries: list[Entry]) -> list[str]:
    """The full profile's settings this run leaves out, as `--only` values."""
    ran = {(e.method, e.setting) for e in entries}
    return [e.label for e in FULL.entries if (e.method, e.setting) not in ran]


def _speed_model(opts: BenchOptions) -> torch.nn.Module:
    """The model timed; random weights come from `SPEED_MODEL_SEED`, so every run times the same one
    (OpenVINO's INT8 coverage and VTP's kept dimensions depend on the weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SPEED_MODEL_SEED)
        return build_model(
            opts.model, pretrained=opts.pretrained, checkpoint=opts.checkpoint, **opts.model_kwargs
        )


def _calibration_images(opts: BenchOptions, model: torch.nn.Module, samples: int) -> list:
    """Images for the data-aware solvers on the speed model: the user's folder, else seeded noise
    (enough to time a solver; labels are dropped, so the Fisher uses the model's own predictions)."""
    if opts.calibration_data is not None:
        loader = imagefolder_loader(opts.calibration_data, model, batch_size=32)
        return make_calibration((images for images, _ in loader), samples)
    return example_input(trace(model), samples)


def _base(opts: BenchOptions) -> dict:
    return {"model": opts.model, "kwargs": opts.model_kwargs, "pretrained": opts.pretrained,
            "checkpoint": opts.checkpoint}


def _timing_plan(opts: BenchOptions, profile: Profile) -> TimingPlan:
    engines = opts.engines if opts.engines is not None else available_engines(profile.extra_columns)
    return TimingPlan(
        batch_sizes=opts.batch_sizes if opts.batch_sizes is not None else profile.batch_sizes,
        engines=engines,
        rounds=opts.rounds or profile.rounds,
        seconds_per_block=opts.seconds_per_block or profile.seconds_per_block,
        num_cores=opts.num_cores,
    )


def _int8_formats(engines: tuple[str, ...]) -> tuple[str, ...]:
    """The INT8 formats an engine among `engines` runs as INT8."""
    names = {engine_name(column) for column in engines}
    return tuple(form for form, runs_on in FORMAT_ENGINES.items() if names & set(runs_on))


def _digits_stage(planned: list[PlannedEntry], opts: BenchOptions, profile: Profile, artifacts: Path,
                  progress: RunProgress) -> list[Row]:
    """The dense digits-vit row, then each entry's accuracy rows."""
    progress.log(f"[1/3] accuracy on {DIGITS}: {', '.join(p.entry.label for p in planned)}")
    progress.begin()
    if not cached_weights_path().exists():
        progress.log(f"      training {DIGITS} once (about 30 s on 2 cores) into {cached_weights_path()}")
    dense = build_model(DIGITS, pretrained=True, progress=progress.bars)
    ctx = DigitsContext(dense=dense, loaders=digits_loaders(), artifacts=artifacts,
                        epochs=opts.epochs or profile.epochs, long_epochs=opts.epochs,
                        progress=progress.bars, log=progress.log)
    rows = [dense_digits_row(ctx)]
    progress.done("digits", f"{DIGITS} dense")
    for item in planned:
        ctx.seeds = opts.seeds or profile.seeds.get(item.entry.method)
        made = item.spec.digits_rows(item.setting, ctx)
        rows += _stamped(made, item.entry)
        progress.done("digits", f"{item.entry.label} on {DIGITS}" + _top1_note(made))
    return rows


def _top1_note(rows: list[Row]) -> str:
    scores = [f"{100 * r.top1:.1f} %" for r in rows if r.top1 is not None]
    return f" (top-1 {', '.join(scores)})" if scores else ""


def _stamped(rows: list[Row], entry: Entry) -> list[Row]:
    """Rows marked with the entry that made them, so a digits-vit row and a speed row of the same setting
    find each other; of `vtp=0.4+int8` the float rows are `vtp=0.4`, the INT8 twins `vtp=0.4+int8`."""
    for row in rows:
        label = entry.label
        if label.endswith(INT8_SUFFIX) and not is_int8_row(row):
            label = label[: -len(INT8_SUFFIX)]
        row.entry = label
    return rows


def _speed_context(opts: BenchOptions, profile: Profile, model: torch.nn.Module, plan: TimingPlan,
                   progress: RunProgress) -> SpeedContext:
    samples = profile.calibration_samples
    return SpeedContext(model=model, model_name=opts.model, base=_base(opts),
                        calibration=_calibration_images(opts, model, samples), calibration_samples=samples,
                        int8_calibration=_calibration_images(opts, model, INT8_CALIBRATION),
                        int8_formats=_int8_formats(plan.engines), log=progress.log,
                        export={"quant_atol": SPEED_MODEL_ATOL})


def _baselines(ctx: SpeedContext) -> list[SpeedCandidate]:
    """The dense model, and the dense model as a QDQ INT8 file (a dense alternative every speed-up is
    measured against) where an engine that runs it is timed."""
    candidates = [ctx.candidate("dense", {}, PassManager(trace(ctx.model), recipe=Recipe(base=ctx.base)))]
    if "qdq" in ctx.int8_formats:
        candidates.append(int8_speed_candidate(ctx, None, "qdq"))
    return candidates


def _speed_candidates(planned: list[PlannedEntry], ctx: SpeedContext, progress: RunProgress
                      ) -> list[SpeedCandidate]:
    """The baselines, then each entry's graphs (one per distinct row: `heads=0.3:full` and `heads=0.3:l1`
    time the same shapes). A baseline an entry also asks for (`int8=dense`'s QDQ file) takes its label,
    so the report counts it with the entry's other rows."""
    candidates = _baselines(ctx)
    seen = {c.row.label(): c for c in candidates}
    for item in planned:
        for candidate in item.spec.speed_candidates(item.setting, ctx):
            _stamped([candidate.row], item.entry)
            known = seen.get(candidate.row.label())
            if known is None:
                seen[candidate.row.label()] = candidate
                candidates.append(candidate)
            elif known.row.entry is None:
                known.row.entry = candidate.row.entry
        for label in item.spec.shared_baselines(item.setting, ctx):
            if label in seen and seen[label].row.entry is None:
                _stamped([seen[label].row], item.entry)
        progress.done("graph", f"{item.entry.label} on {ctx.model_name}")
    return candidates


def _peak_rss_mb() -> float:
    """Peak resident memory of this process or any child it waited for, in MiB (Linux reports KiB)."""
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return round(peak / 1024, 1)


def _meta(opts: BenchOptions, plan: TimingPlan, entries: list[Entry], progress: RunProgress) -> dict:
    weights = opts.checkpoint or ("pretrained" if opts.pretrained else f"random (seed {SPEED_MODEL_SEED})")
    return {
        "profile": opts.profile,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": list(cpu_flags()),
        "num_cores": plan.num_cores,
        "entries": [{"entry": e.label, "digits": e.digits, "speed": e.speed} for e in entries],
        "left_out": left_out(entries),
        "speed_model": opts.model,
        "speed_weights": weights,
        "calibration": str(opts.calibration_data) if opts.calibration_data else "seeded random images",
        "batch_sizes": list(plan.batch_sizes),
        "engines": list(plan.engines),
        "timing": {
            "rounds": plan.rounds,
            "seconds_per_block": plan.seconds_per_block,
            "method": "each runner timed in consecutive-call blocks after its own warm-up, "
            "runners alternating across rounds",
        },
        "versions": {**library_versions(), **engine_versions()},
        "engines_left_out": engines_left_out(),
        "sparse_kernel_thresholds": (kernel_thresholds() if KERNEL_ENGINE in map(engine_name, plan.engines)
                                     else None),
        "python": platform.python_version(),
        "wall_s": round(progress.elapsed(), 1),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _steps(planned: list[PlannedEntry], opts: BenchOptions, plan: TimingPlan) -> Counter:
    """How many steps of each kind the run has, for the progress bar and ETA."""
    digits = [p for p in planned if p.entry.digits] if opts.accuracy else []
    speed = [p for p in planned if p.entry.speed] if _times_anything(plan) else []
    groups = -(-len(speed) // plan.models_per_group) or 1  # recounted once the graphs are built
    return Counter(digits=len(digits) + bool(digits), graph=len(speed),
                   timing=groups * len(plan.batch_sizes) if _times_anything(plan) else 0)


def _times_anything(plan: TimingPlan) -> bool:
    """Whether the run times any engine at any batch size (`-e none` and `-b none` time nothing)."""
    return bool(plan.engines and plan.batch_sizes)


def _speed_stage(planned: list[PlannedEntry], opts: BenchOptions, profile: Profile, plan: TimingPlan,
                 model: torch.nn.Module, artifacts: Path, progress: RunProgress) -> list[Row]:
    """The baselines and each entry's graphs of `model`, timed side by side."""
    progress.log(f"[2/3] speed graphs of {opts.model}: {', '.join(p.entry.label for p in planned) or 'none'}")
    progress.begin()
    ctx = _speed_context(opts, profile, model, plan, progress)
    candidates = _speed_candidates(planned, ctx, progress)
    groups = timing_groups(candidates, plan.models_per_group)
    progress.expect("timing", len(groups) * len(plan.batch_sizes))
    progress.log(f"[3/3] timing {len(candidates)} models in {len(groups)} group(s) at batch sizes "
                 f"{list(plan.batch_sizes)} on {', '.join(plan.engines)} ({plan.rounds} rounds of "
                 f"{plan.seconds_per_block:g} s blocks)")
    measure_speed(candidates, plan, artifacts, progress=progress.bars,
                  on_group=lambda label: progress.done("timing", label), log=progress.log)
    return [c.row for c in candidates]


def _guesses(plan: TimingPlan) -> dict[str, float]:
    """Seconds a step takes before one has been timed: a speed graph (tracing, a pass, costs) and a timing
    group (a full group's engines compiled, then every runner timed in each round)."""
    runners = plan.models_per_group * len(plan.engines)
    return {"graph": 10.0,
            "timing": runners * (3.0 + plan.rounds * (plan.seconds_per_block + plan.warmup_seconds))}


def check_disk_space(output_dir: Path, model: torch.nn.Module, graphs: int, batch_sizes: int) -> None:
    """OSError before any work when the artifacts will not fit: each timed graph is exported at every batch
    size as model.onnx and weights.safetensors (about 8 bytes a parameter; VTP's and the combined rows'
    engine forms add half as much again)."""
    params = sum(p.numel() for p in model.parameters())
    needed = 8 * params * 1.5 * batch_sizes * graphs
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OSError(f"the artifacts need about {needed / 1e9:.1f} GB in {output_dir}, {free / 1e9:.1f} GB "
                      f"is free; free some space, write elsewhere (-o DIR), or time less (--only, -b 1)")


def run_prune_and_bench(opts: BenchOptions) -> Path:
    """Run the whole path and write report.md, results.json and the plots; returns the run folder."""
    profile = get_profile(opts.profile)
    entries = resolve_entries(profile, opts.only, opts.skip)
    planned = plan_entries(entries)
    plan = _timing_plan(opts, profile)
    steps = _steps(planned, opts, plan)
    model = _speed_model(opts)
    for item in planned if _times_anything(plan) else ():
        if item.entry.speed:
            item.spec.check(item.setting, model)  # fail now, not after the digits-vit rows
    check_disk_space(opts.output_dir, model, steps["graph"] + 2, len(plan.batch_sizes))
    progress = RunProgress(steps, quiet=opts.quiet, guesses=_guesses(plan))
    run_dir = opts.output_dir / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{profile.name}"
    artifacts = run_dir / "artifacts"
    rows: list[Row] = []
    digits = [p for p in planned if p.entry.digits]
    if opts.accuracy and digits:
        rows += _digits_stage(digits, opts, profile, artifacts, progress)
    if _times_anything(plan):
        rows += _speed_stage([p for p in planned if p.entry.speed], opts, profile, plan, model, artifacts,
                             progress)
    written = write_report(run_dir, _meta(opts, plan, entries, progress), rows)
    progress.close(f"prune-and-bench done in {clock(progress.elapsed())}: {written['report']}")
    return run_dir

