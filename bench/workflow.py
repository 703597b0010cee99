"""The prune-and-bench workflow: accuracy on the built-in digits-vit, speed on a real-size ViT.

Methods join through METHODS (name → pass factory); today: magnitude masks.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vitsparse.compiler import GraphPass, PassManager, Recipe, trace
from vitsparse.compiler.export import library_versions
from vitsparse.models import build_model
from vitsparse.pruners import MagnitudePass
from vitsparse.runtime import ENGINES as RUNTIME_ENGINES

from .accuracy import digits_rows
from .profiles import get_profile
from .report import speed_table, write_report
from .schema import Row
from .speed import TORCH, SpeedCandidate, TimingPlan, measure_speed

METHODS: dict[str, Callable[[float], GraphPass]] = {"magnitude": lambda s: MagnitudePass(sparsity=s)}
ENGINES = (*RUNTIME_ENGINES, TORCH)  # the CPU engines plus dense PyTorch as the baseline


@dataclass
class BenchOptions:
    profile: str = "default"
    model: str = "deit_small_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    methods: tuple[str, ...] = ("magnitude",)
    sparsities: tuple[float, ...] | None = None  # overrides the profile's speed settings
    accuracy_sparsities: tuple[float, ...] | None = None  # overrides the profile's digits settings
    finetune_epochs: int | None = None
    batch_sizes: tuple[int, ...] | None = None
    engines: tuple[str, ...] = ENGINES
    seconds_per_block: float | None = None
    rounds: int | None = None
    num_cores: int | None = None
    output_dir: Path = field(default_factory=lambda: Path("bench/results"))
    accuracy: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.engines) - set(ENGINES))
        if unknown:
            raise ValueError(
                f"unknown methods/engines {unknown}; methods: {', '.join(METHODS)}; "
                f"engines: {', '.join(ENGINES)}"
            )
        if any(not 0 <= s < 1 for s in self.sparsities or ()):
            raise ValueError(f"sparsities must lie in [0, 1), got {self.sparsities}")


def _speed_candidates(opts: BenchOptions, sparsities: tuple[float, ...]) -> list[SpeedCandidate]:
    """The dense speed model first, then every method at every setting."""
    model = build_model(
        opts.model, pretrained=opts.pretrained, checkpoint=opts.checkpoint, **opts.model_kwargs
    )
    base = {
        "model": opts.model,
        "kwargs": opts.model_kwargs,
        "pretrained": opts.pretrained,
        "checkpoint": opts.checkpoint,
    }
    runs: list[tuple[str, dict, GraphPass | None]] = [("dense", {}, None)]
    runs += [(m, {"sparsity": s}, METHODS[m](s)) for m in opts.methods for s in sparsities]
    candidates = []
    for method, settings, graph_pass in runs:
        manager = PassManager(trace(model), recipe=Recipe(base=base))
        if graph_pass is not None:
            manager.run(graph_pass)
        costs = manager.costs
        row = Row(
            model=opts.model,
            method=method,
            settings=settings,
            macs=costs.macs,
            params=costs.params,
            nonzero_params=costs.nonzero_params,
        )
        candidates.append(SpeedCandidate(row, manager.graph_module, manager.recipe))
    return candidates


def _meta(opts: BenchOptions, plan: TimingPlan, started: float) -> dict:
    weights = opts.checkpoint or ("pretrained" if opts.pretrained else "random")
    return {
        "profile": opts.profile,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "num_cores": plan.num_cores,
        "speed_model": opts.model,
        "speed_weights": weights,
        "batch_sizes": list(plan.batch_sizes),
        "engines": list(plan.engines),
        "timing": {
            "rounds": plan.rounds,
            "seconds_per_block": plan.seconds_per_block,
            "method": "each runner timed in consecutive-call blocks after its own warm-up, "
            "runners alternating across rounds",
        },
        "versions": library_versions(),
        "python": platform.python_version(),
        "duration_s": time.perf_counter() - started,
    }


def run_prune_and_bench(opts: BenchOptions) -> Path:
    """Run the whole path and write report.md, results.json and speedup.png; returns the run folder."""
    started = time.perf_counter()
    profile = get_profile(opts.profile)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = opts.output_dir / f"{stamp}-{profile.name}"
    artifacts = run_dir / "artifacts"
    plan = TimingPlan(
        batch_sizes=opts.batch_sizes or profile.batch_sizes,
        engines=opts.engines,
        rounds=opts.rounds or profile.rounds,
        seconds_per_block=opts.seconds_per_block or profile.seconds_per_block,
        num_cores=opts.num_cores,
    )
    rows: list[Row] = []
    if opts.accuracy:
        settings = opts.accuracy_sparsities or profile.accuracy_sparsities
        print(f"[1/2] accuracy on digits-vit: magnitude at {settings}", flush=True)
        rows += digits_rows(
            settings, opts.finetune_epochs or profile.finetune_epochs, artifacts, opts.progress
        )
    sparsities = opts.sparsities or profile.speed_sparsities
    print(
        f"[2/2] speed on {opts.model}: {', '.join(opts.methods)} at {sparsities}, batch sizes "
        f"{plan.batch_sizes}, engines {', '.join(plan.engines)}",
        flush=True,
    )
    candidates = _speed_candidates(opts, sparsities)
    measure_speed(candidates, plan, artifacts)
    rows += [c.row for c in candidates]
    written = write_report(run_dir, _meta(opts, plan, started), rows)
    print(speed_table([c.row for c in candidates]))
    print("\n".join(f"wrote {p}" for p in written.values()))
    return run_dir
