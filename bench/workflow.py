"""The prune-and-bench workflow: accuracy on the built-in digits-vit, speed on a real-size ViT.

Methods join through `methods.METHODS` (name → saliency and scope of the shared sparsity pass).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vitsparse.compiler import GraphPass, PassManager, Recipe, attention_macs, trace
from vitsparse.compiler.export import library_versions
from vitsparse.compiler.trace import example_input
from vitsparse.models import build_model, imagefolder_loader
from vitsparse.pruners import make_calibration
from vitsparse.runtime import ENGINES as RUNTIME_ENGINES
from vitsparse.runtime import RuntimeInputError, check_engine_spec, engine_status, engine_versions

from .accuracy import MODEL as DIGITS
from .accuracy import digits_rows
from .combined import METHOD as COMBINED
from .combined import CombinedSetting, combined_digits_row, combined_speed_graph
from .head_channels import METHOD as HEAD_CHANNELS
from .head_channels import (
    HeadChannelSetting,
    check_budgets_fit,
    check_settings,
    head_channel_digits_rows,
    head_channel_speed_graph,
)
from .int8 import BASE as BASE_MASKS
from .int8 import (
    FORMAT_ENGINES,
    int8_digits_rows,
    int8_digits_twins,
    int8_speed_candidates,
    int8_twin,
    int8_twins,
)
from .int8 import SPEED_CALIBRATION as INT8_CALIBRATION
from .methods import METHODS, SpeedSetting
from .profiles import get_profile
from .report import combined_setting_label, speed_table, write_report
from .schema import Row
from .speed import SPEED_MODEL_ATOL, TORCH, SpeedCandidate, TimingPlan, engine_name, measure_speed
from .staged import StagedSchedule
from .token_drop import METHOD as TOKEN_DROP
from .token_drop import TokenDropSetting, token_drop_digits_rows, token_drop_speed_graph
from .token_drop import check_settings as check_token_drop_settings
from .token_drop import speed_settings as token_drop_speed_settings
from .vtp import METHOD as VTP
from .vtp import VtpSetting, vtp_digits_rows, vtp_speed_graph

ENGINES = (*RUNTIME_ENGINES, TORCH)  # the CPU engines plus dense PyTorch as the baseline
PRECISION_COLUMNS = ("openvino:bf16",)  # timed beside the f32 columns where the CPU can run them
SOLVER_TIMING_SPARSITY = 0.75
SPEED_MODEL_SEED = 0  # the speed model's random weights: one model across runs, whatever ran before
SPEED_CALIBRATION_IMAGES = 128  # for a data-aware --speed-method when solver timing is skipped


def available_engines() -> tuple[str, ...]:
    """The engines that can run here (DeepSparse needs Python < 3.12), OpenVINO in bf16 too where the CPU
    has bf16 instructions, plus PyTorch."""
    columns = [e for e in RUNTIME_ENGINES if engine_status(e).available]
    columns += [c for c in PRECISION_COLUMNS if _runs_here(c)]
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
    model: str = "deit_small_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    methods: tuple[str, ...] = tuple(METHODS)  # compared on digits-vit (and timed as solvers)
    speed_method: str = "magnitude"  # chooses the masks timed on the speed model
    speed_settings: tuple[SpeedSetting, ...] | None = None  # overrides the profile's
    accuracy_sparsities: tuple[float, ...] | None = None  # overrides the profile's digits settings
    vtp_rates: tuple[float, ...] | None = None  # overrides the profile's VTP rates (digits, speed); () skips
    head_channel_budgets: tuple[float, ...] | None = None  # overrides the profile's (digits, speed); () skips
    head_channel_variants: tuple[str, ...] | None = None  # overrides the profile's digits-vit variants
    head_channel_seeds: int | None = None  # overrides the profile's seeds per digits-vit setting
    token_drop_ratios: tuple[float, ...] | None = None  # overrides the digits FLOPs ratios; () skips
    token_drop_modes: tuple[str, ...] | None = None  # overrides the profile's (fixed, learned)
    token_drop_seeds: int | None = None
    token_drop_speed: tuple[float, ...] | None = None  # overrides the profile's timed keep rates; () skips
    combined: bool = True  # the combined recipes' rows (when the profile has them)
    combined_frontier: tuple[CombinedSetting, ...] | None = None  # overrides the profile's INT8 recipes
    combined_schedule: StagedSchedule | None = None  # overrides the profile's digits-vit stages
    combined_seeds: int | None = None  # overrides the profile's seeds per combined recipe
    int8_sparsities: tuple[float, ...] | None = None  # overrides the profile's digits INT8 rows; () skips
    int8_speed: tuple | None = None  # overrides the profile's timed INT8 models (Int8SpeedSetting); () skips
    int8_formats: tuple[str, ...] | None = None  # overrides the profile's INT8 twins' formats; () skips
    finetune_epochs: int | None = None
    solver_timing_samples: int | None = None  # overrides the profile's; 0 skips solver timing
    calibration_data: Path | None = None  # ImageFolder for solver timing; random images otherwise
    batch_sizes: tuple[int, ...] | None = None
    engines: tuple[str, ...] = field(default_factory=available_engines)
    seconds_per_block: float | None = None
    rounds: int | None = None
    num_cores: int | None = None
    output_dir: Path = field(default_factory=lambda: Path("bench/results"))
    accuracy: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        unknown += [self.speed_method] if self.speed_method not in METHODS else []
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        for column in self.engines:
            if column != TORCH:
                check_engine_spec(column)  # unknown, not installed, or a precision this CPU lacks
        if any(not 0 <= s < 1 for s in (*(self.accuracy_sparsities or ()), *(self.int8_sparsities or ()))):
            raise ValueError(f"sparsities must lie in [0, 1), got {self.accuracy_sparsities}")
        if any(not 0 <= r < 1 for r in self.vtp_rates or ()):
            raise ValueError(f"VTP rates must lie in [0, 1), got {self.vtp_rates}")
        check_settings(self.head_channel_budgets or (), self.head_channel_variants or ())
        for name in ("head_channel_seeds", "token_drop_seeds", "combined_seeds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        check_token_drop_settings(tuple(TokenDropSetting(r, m) for r in self.token_drop_ratios or (1.0,)
                                        for m in self.token_drop_modes or ("fixed",)))
        if any(isinstance(k, bool) or not 0 < k <= 1 for k in self.token_drop_speed or ()):
            raise ValueError(f"token-drop keep rates must lie in (0, 1], got {self.token_drop_speed}")
        unknown_formats = sorted(set(self.int8_formats or ()) - set(FORMAT_ENGINES))
        if unknown_formats:
            raise ValueError(f"unknown INT8 formats {unknown_formats}; choose from "
                             f"{', '.join(FORMAT_ENGINES)}")
        if self.solver_timing_samples is not None and self.solver_timing_samples < 0:
            raise ValueError(f"solver timing samples must be >= 0, got {self.solver_timing_samples}")


def _base(opts: BenchOptions) -> dict:
    return {
        "model": opts.model,
        "kwargs": opts.model_kwargs,
        "pretrained": opts.pretrained,
        "checkpoint": opts.checkpoint,
    }


def _costed_row(opts: BenchOptions, method: str, settings: dict, manager: PassManager) -> Row:
    costs = manager.costs
    return Row(
        model=opts.model,
        method=method,
        settings=settings,
        macs=costs.macs,
        attention_macs=attention_macs(manager.graph_module, manager.structure, costs),
        params=costs.params,
        nonzero_params=costs.nonzero_params,
    )


def _speed_model(opts: BenchOptions) -> torch.nn.Module:
    """The model timed; random weights come from `SPEED_MODEL_SEED`, so every run times the same one
    (OpenVINO's INT8 coverage and VTP's kept dimensions depend on the weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SPEED_MODEL_SEED)
        return build_model(
            opts.model, pretrained=opts.pretrained, checkpoint=opts.checkpoint, **opts.model_kwargs
        )


def _speed_candidates(
    opts: BenchOptions,
    model: torch.nn.Module,
    settings: tuple[SpeedSetting, ...],
    calibration,
    vtp_settings: tuple[VtpSetting, ...] = (),
    head_channel_budgets: tuple[float, ...] = (),
    token_keep_rates: tuple[float, ...] = (),
    combined=None,
) -> list[SpeedCandidate]:
    """The dense speed model first, then the speed method at every mask setting, then VTP's and the
    head-equal channel shapes, static token dropping and the combined recipe."""
    method = METHODS[opts.speed_method]
    runs: list[tuple[str, dict, GraphPass | None]] = [("dense", {}, None)]
    runs += [
        (opts.speed_method, s.settings(), method.make_pass(s.sparsity, s.pattern, calibration))
        for s in settings
    ]
    candidates = []
    for name, row_settings, graph_pass in runs:
        manager = PassManager(trace(model), recipe=Recipe(base=_base(opts)))
        if graph_pass is not None:
            manager.run(graph_pass)
        row = _costed_row(opts, name, row_settings, manager)
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe))
    for setting in vtp_settings:
        manager = vtp_speed_graph(model, setting, Recipe(base=_base(opts)))
        row = _costed_row(opts, VTP, setting.settings(), manager)
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe))
    for budget in head_channel_budgets:
        manager = head_channel_speed_graph(model, budget, Recipe(base=_base(opts)))
        settings = {"budget": budget, "multiple": manager.recipe.passes[-1].params["multiple"]}
        row = _costed_row(opts, HEAD_CHANNELS, settings, manager)
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe))
    token_ranking = {"atol": SPEED_MODEL_ATOL}  # see SPEED_MODEL_ATOL
    for keep_rate in token_keep_rates:
        manager = token_drop_speed_graph(model, keep_rate, Recipe(base=_base(opts)))
        row = _costed_row(opts, TOKEN_DROP, token_drop_speed_settings(manager), manager)
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe, export=token_ranking))
    if combined is not None:
        manager = combined_speed_graph(model, combined, Recipe(base=_base(opts)))
        row = _costed_row(opts, COMBINED, combined.settings(), manager)
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe, export=token_ranking))
    return candidates


def _calibration_images(opts: BenchOptions, model: torch.nn.Module, samples: int):
    """Images for the data-aware solvers on the speed model: the user's folder, else seeded noise
    (enough to time a solver; labels are dropped, so the Fisher uses the model's own predictions)."""
    if opts.calibration_data is not None:
        loader = imagefolder_loader(opts.calibration_data, model, batch_size=32)
        return make_calibration((images for images, _ in loader), samples)
    return example_input(trace(model), samples)


def _solver_rows(opts: BenchOptions, model: torch.nn.Module, calibration, samples: int) -> list[Row]:
    """Each data-aware method, one-shot on the speed model: how long choosing the masks takes."""
    rows = []
    for name in (m for m in opts.methods if METHODS[m].needs_calibration):
        print(f"      {name} at {SOLVER_TIMING_SPARSITY:.0%}", flush=True)
        manager = PassManager(trace(model), recipe=Recipe(base=_base(opts)))
        manager.run(METHODS[name].make_pass(SOLVER_TIMING_SPARSITY, calibration=calibration, samples=samples))
        row = _costed_row(
            opts, name, {"sparsity": SOLVER_TIMING_SPARSITY, "pattern": "unstructured"}, manager
        )
        row.prune_seconds = manager.recipe.passes[-1].stats["seconds"]
        row.calibration_samples = manager.recipe.passes[-1].stats.get("calibration_samples")
        rows.append(row)
    return rows


def _meta(opts: BenchOptions, plan: TimingPlan, started: float) -> dict:
    weights = opts.checkpoint or ("pretrained" if opts.pretrained else f"random (seed {SPEED_MODEL_SEED})")
    return {
        "profile": opts.profile,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "num_cores": plan.num_cores,
        "speed_model": opts.model,
        "speed_weights": weights,
        "speed_method": opts.speed_method,
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
        "python": platform.python_version(),
        "duration_s": time.perf_counter() - started,
    }


def _timing_plan(opts: BenchOptions, profile) -> TimingPlan:
    return TimingPlan(
        batch_sizes=opts.batch_sizes or profile.batch_sizes,
        engines=opts.engines,
        rounds=opts.rounds or profile.rounds,
        seconds_per_block=opts.seconds_per_block or profile.seconds_per_block,
        num_cores=opts.num_cores,
    )


def _head_channel_budgets(opts: BenchOptions, profile) -> tuple[float, ...]:
    return profile.head_channel_budgets if opts.head_channel_budgets is None else opts.head_channel_budgets


def _head_channel_rows(opts: BenchOptions, profile, epochs: int, artifacts: Path) -> list[Row]:
    """Head-equal channel removal on digits-vit: every budget × variant, averaged over seeds."""
    budgets = _head_channel_budgets(opts, profile)
    variants = opts.head_channel_variants or profile.head_channel_variants
    seeds = opts.head_channel_seeds or profile.head_channel_seeds
    if not budgets:
        return []
    print(f"      head-channels at budgets {budgets}, variants {', '.join(variants)}, {seeds} seed(s) each",
          flush=True)
    settings = tuple(HeadChannelSetting(b, v) for b in budgets for v in variants)
    return head_channel_digits_rows(settings, epochs, seeds, artifacts, progress=opts.progress)


def _token_drop_rows(opts: BenchOptions, profile, epochs: int, artifacts: Path) -> list[Row]:
    """Token dropping on digits-vit: every FLOPs ratio in every mode, averaged over seeds."""
    ratios = profile.token_drop_ratios if opts.token_drop_ratios is None else opts.token_drop_ratios
    modes = opts.token_drop_modes or profile.token_drop_modes
    seeds = opts.token_drop_seeds or profile.token_drop_seeds
    if not ratios:
        return []
    print(f"      token-drop at FLOPs ratios {ratios}, {', '.join(modes)}, {seeds} seed(s) each", flush=True)
    settings = tuple(TokenDropSetting(r, m) for r in ratios for m in modes)
    finetune_epochs = opts.finetune_epochs or profile.token_drop_finetune_epochs
    return token_drop_digits_rows(settings, epochs, seeds, artifacts, progress=opts.progress,
                                  finetune_epochs=finetune_epochs)


def _int8_label(setting) -> str:
    masks = "dense" if setting.masks is None else f"{setting.masks.sparsity:g} {setting.masks.pattern}"
    return f"{masks} {setting.format}"


def _int8_digits(opts: BenchOptions, profile, epochs: int, artifacts: Path) -> list[Row]:
    """INT8 on digits-vit at each sparsity."""
    sparsities = profile.int8_sparsities if opts.int8_sparsities is None else opts.int8_sparsities
    if not sparsities:
        return []
    print(f"      int8 at sparsities {sparsities} ({BASE_MASKS} masks)", flush=True)
    return int8_digits_rows(sparsities, epochs, artifacts)


def _int8_digits_twins(opts: BenchOptions, profile, rows: list[Row], artifacts: Path) -> list[Row]:
    """The structured and token digits-vit rows in INT8, when their speed rows are also timed in INT8."""
    if not _int8_formats(opts, profile):
        return []
    print("      int8 twins of the vtp, head-channel and token-drop rows (QAT, every export checked)",
          flush=True)
    return int8_digits_twins(rows, artifacts, progress=opts.progress)


def _combined_digits(opts: BenchOptions, profile, artifacts: Path) -> list[Row]:
    """The float combined recipe, then each INT8 recipe of the frontier, on digits-vit stage by stage."""
    schedule = opts.combined_schedule or profile.combined_schedule
    seeds = opts.combined_seeds or profile.combined_seeds
    rows = []
    for setting in filter(None, (_combined(opts, profile), *_frontier(opts, profile))):
        print(f"      combined: {combined_setting_label(setting.settings())}, staged "
              f"({schedule.epochs(setting.passes())} epochs), {seeds} seed(s)", flush=True)
        rows.append(combined_digits_row(setting, schedule, seeds, artifacts, progress=opts.progress))
    return rows


def _int8_formats(opts: BenchOptions, profile) -> tuple[str, ...]:
    """The INT8 formats of the structured, token and combined twins whose engines are timed."""
    formats = profile.int8_formats if opts.int8_formats is None else opts.int8_formats
    return tuple(f for f in formats if _runs_timed(opts, f))


def _runs_timed(opts: BenchOptions, form: str) -> bool:
    """Whether an engine that runs INT8 format `form` is among the timed engines."""
    return bool({engine_name(column) for column in opts.engines} & set(FORMAT_ENGINES[form]))


def _int8_speed(opts: BenchOptions, profile, model: torch.nn.Module, settings: tuple,
                float_candidates: list[SpeedCandidate]) -> list[SpeedCandidate]:
    """The timed INT8 models whose engine is timed, the INT8 twins of the structured and token rows,
    then every INT8 recipe of the combined frontier in each twin format."""
    settings = tuple(s for s in settings if _runs_timed(opts, s.format))
    formats = _int8_formats(opts, profile)
    if not settings and not formats:
        return []
    calibration = _calibration_images(opts, model, INT8_CALIBRATION)
    candidates = int8_speed_candidates(model, settings, calibration, _base(opts),
                                       lambda method, row_settings, manager: _costed_row(
                                           opts, method, row_settings, manager))
    export = {"quant_atol": SPEED_MODEL_ATOL}
    candidates += int8_twins(float_candidates, formats, calibration, export)
    for setting in _frontier(opts, profile) if formats else ():
        manager = combined_speed_graph(model, setting, Recipe(base=_base(opts)))
        recipe = SpeedCandidate(_costed_row(opts, COMBINED, setting.settings(), manager),
                                manager.graph_module, manager.recipe)
        candidates += [int8_twin(recipe, form, calibration, setting.quant_config(),
                                 export=export) for form in formats]
    return candidates


def _combined(opts: BenchOptions, profile) -> CombinedSetting | None:
    return profile.combined if opts.combined else None


def _frontier(opts: BenchOptions, profile) -> tuple[CombinedSetting, ...]:
    """The INT8 combined recipes (INT8 on, whatever a setting says)."""
    if not opts.combined:
        return ()
    settings = profile.combined_frontier if opts.combined_frontier is None else opts.combined_frontier
    return tuple(replace(s, int8=True) for s in settings)


def run_prune_and_bench(opts: BenchOptions) -> Path:
    """Run the whole path and write report.md, results.json and the plots; returns the run folder."""
    started = time.perf_counter()
    profile = get_profile(opts.profile)
    run_dir = opts.output_dir / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{profile.name}"
    artifacts = run_dir / "artifacts"
    plan = _timing_plan(opts, profile)
    model = _speed_model(opts)
    head_budgets = _head_channel_budgets(opts, profile)
    check_budgets_fit(model, head_budgets)  # fail now, not after the accuracy stage
    if opts.accuracy:
        check_budgets_fit(build_model(DIGITS), head_budgets)
    rows: list[Row] = []
    if opts.accuracy:
        sparsities = opts.accuracy_sparsities or profile.accuracy_sparsities
        print(f"[1/3] accuracy on digits-vit: {', '.join(opts.methods)} at {sparsities}", flush=True)
        epochs = opts.finetune_epochs or profile.finetune_epochs
        rows += digits_rows(opts.methods, sparsities, epochs, artifacts, opts.progress)
        vtp_rates = profile.vtp_rates if opts.vtp_rates is None else opts.vtp_rates
        if vtp_rates:
            print(f"      vtp (dimension slicing) at rates {vtp_rates}", flush=True)
            rows += vtp_digits_rows(vtp_rates, epochs, artifacts, progress=opts.progress)
        rows += _head_channel_rows(opts, profile, epochs, artifacts)
        rows += _token_drop_rows(opts, profile, epochs, artifacts)
        rows += _int8_digits(opts, profile, epochs, artifacts)
        rows += _int8_digits_twins(opts, profile, rows, artifacts)
        rows += _combined_digits(opts, profile, artifacts)
    samples = (
        profile.solver_timing_samples if opts.solver_timing_samples is None else opts.solver_timing_samples
    )
    calibration = _calibration_images(opts, model, samples or SPEED_CALIBRATION_IMAGES)
    if samples:
        print(f"[2/3] solver time on {opts.model}, {samples} calibration images", flush=True)
        rows += _solver_rows(opts, model, calibration, samples)
    settings = opts.speed_settings or profile.speed_settings
    vtp_speed = profile.vtp_speed if opts.vtp_rates is None else tuple(VtpSetting(r) for r in opts.vtp_rates)
    token_keep = profile.token_drop_speed if opts.token_drop_speed is None else opts.token_drop_speed
    int8_speed = profile.int8_speed if opts.int8_speed is None else opts.int8_speed
    print(
        f"[3/3] speed on {opts.model}: {opts.speed_method} masks at "
        f"{', '.join(f'{s.sparsity:g} {s.pattern}' for s in settings)}; vtp at "
        f"{', '.join(f'{v.rate:g} (multiple {v.multiple})' for v in vtp_speed) or 'none'}; "
        f"head-channels at {', '.join(f'{b:g}' for b in head_budgets) or 'none'}; "
        f"token-drop keep {', '.join(f'{k:g}' for k in token_keep) or 'none'}; "
        f"combined {'yes' if _combined(opts, profile) else 'no'}, {len(_frontier(opts, profile))} in int8; "
        f"int8 {', '.join(_int8_label(s) for s in int8_speed) or 'none'}; structured and token rows "
        f"also as int8 in {', '.join(_int8_formats(opts, profile)) or 'no format'}; "
        f"batch sizes {plan.batch_sizes}, engines {', '.join(plan.engines)}",
        flush=True,
    )
    candidates = _speed_candidates(opts, model, settings, calibration, vtp_speed, head_budgets, token_keep,
                                   _combined(opts, profile))
    candidates += _int8_speed(opts, profile, model, int8_speed, candidates)
    measure_speed(candidates, plan, artifacts, progress=opts.progress)
    rows += [c.row for c in candidates]
    written = write_report(run_dir, _meta(opts, plan, started), rows)
    print(speed_table([c.row for c in candidates]))
    print("\n".join(f"wrote {p}" for p in written.values()))
    return run_dir
