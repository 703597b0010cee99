"""`report.md` and `results.json` of a `vitsparse prune` run, in prune-and-bench's schema.

Two rows: the starting model (`dense`) and the pruned one (`recipe`), each with top-1 on `val/`, MACs,
parameters and non-zero parameters; the pruned row carries every stage's top-1. Unless speed is
skipped, both are timed side by side on every engine installed here at batch 1 and 16 (an INT8 plan's
model in the QDQ format on PyTorch, ONNX Runtime and OpenVINO, in the operator format on DeepSparse).
"""

from __future__ import annotations

import datetime as dt
import platform
import shutil
from pathlib import Path
from typing import Any

import torch.fx as fx

from vitsparse.compiler import Recipe
from vitsparse.compiler.export import library_versions
from vitsparse.models import evaluate
from vitsparse.runtime.availability import engine_versions
from vitsparse.runtime.kernel_crossover import cpu_flags

from .accuracy import make_row
from .report import _pct, plot_speedup, speed_table, write_files_atomically
from .schema import Row, results_document
from .speed import SpeedCandidate, TimingPlan, measure_speed
from .workflow import available_engines, engines_left_out

BATCH_SIZES = (1, 16)
OPERATOR_ENGINES = ("deepsparse",)  # where an INT8 model runs in the operator (MatMulInteger) format


def _candidates(
    rows: list[Row], dense: tuple, pruned: tuple, int8: bool, engines: tuple[str, ...]
) -> list[SpeedCandidate]:
    candidates = [SpeedCandidate(rows[0], *dense), SpeedCandidate(rows[1], *pruned)]
    if int8:  # QDQ everywhere but DeepSparse, which runs the operator format as INT8
        candidates[1].engines = tuple(
            e.split(":")[0] for e in engines if e.split(":")[0] not in OPERATOR_ENGINES
        )
        if any(e in OPERATOR_ENGINES for e in engines):
            twin = Row(**{**vars(rows[1]), "speed": []})
            candidates.append(
                SpeedCandidate(twin, *pruned, engines=OPERATOR_ENGINES, export={"quant_format": "operator"})
            )
    return candidates


def write_prune_report(
    request,
    plan,
    stages: list[dict[str, Any]],
    dense: tuple[fx.GraphModule, Recipe],
    pruned: tuple[fx.GraphModule, Recipe],
    folder,
    loaders,
) -> dict[str, Path]:
    """Measure, time (unless skipped) and write the run's report files into OUT."""
    model = request.model
    dense_top1 = stages[0]["top1"]
    rows = [
        make_row("dense", {}, dense[0], dense_top1, None, model=model),
        make_row(
            "recipe",
            {"recipe": plan.settings.name or Path(plan.source).stem},
            pruned[0],
            evaluate(pruned[0], loaders.val).top1,
            None,
            model=model,
        ),
    ]
    rows[1].stages = [
        {"stage": s["stage"], "epochs": s.get("epochs", 0), "top1": s["top1"]} for s in stages[1:]
    ]
    rows[1].artifact = str(request.out / "artifact")
    int8 = any(s.kind == "int8" for s in plan.stages)
    engines = request.engines or available_engines()
    timing = TimingPlan(
        batch_sizes=BATCH_SIZES, engines=engines, rounds=2, seconds_per_block=request.speed_seconds,
        num_cores=None,
    )
    if request.speed:
        scratch = request.out / ".speed"
        try:
            candidates = _candidates(rows, dense, pruned, int8, engines)
            folder.log("speed", engines=list(engines), batch_sizes=list(BATCH_SIZES))
            print(f"timing the starting and the pruned model side by side on {', '.join(engines)} at batch "
                  f"{' and '.join(map(str, BATCH_SIZES))} ({timing.rounds} rounds of "
                  f"{timing.seconds_per_block:g} s per engine and model, after compiling each)", flush=True)
            measure_speed(candidates, timing, scratch, progress=request.progress)
            for extra in candidates[2:]:
                rows[1].speed.extend(extra.row.speed)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows[0].artifact, rows[1].artifact = None, str(request.out / "artifact")
    meta = _meta(request, plan, engines if request.speed else ())
    files = {
        "results": ("results.json", lambda p: p.write_text(_json(results_document(meta, rows)))),
        "report": ("report.md", lambda p: p.write_text(markdown(meta, rows), encoding="utf-8")),
    }
    if any(r.speed for r in rows[1:]):
        files["speed_plot"] = ("speedup.png", lambda p: plot_speedup(rows, p))
    return write_files_atomically(request.out, files)


def _json(document: dict) -> str:
    import json

    return json.dumps(document, indent=2) + "\n"


def _meta(request, plan, engines) -> dict[str, Any]:
    return {
        "command": "prune",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": request.model,
        "recipe": plan.source,
        "plan": plan.to_dict(),
        "data": str(request.data),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "cpu_flags": list(cpu_flags()),
        "python": platform.python_version(),
        "engines": list(engines),
        "engines_left_out": engines_left_out(),
        "versions": {**library_versions(), **engine_versions()},
    }


def markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    dense, pruned = rows[0], rows[1]
    lines = [
        f"# vitsparse prune: {pruned.settings['recipe']} on {meta['model']}",
        "",
        f"{meta['date']}, Python {meta['python']}, CPU flags {', '.join(meta['cpu_flags']) or 'unknown'}; "
        f"recipe {meta['recipe']}, data {meta['data']}.",
        "",
        "## Top-1 on val/ after each stage",
        "",
        "| stage | epochs | top-1 |",
        "|---|---|---|",
        f"| start | 0 | {_pct(dense.top1)} |",
    ]
    lines += [f"| {s['stage']} | {s['epochs']} | {_pct(s['top1'])} |" for s in pruned.stages or []]
    lines += [
        "",
        "## The model",
        "",
        "| | top-1 | MACs | attention MACs | params | non-zero params |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.method} | {_pct(row.top1)} | {row.macs / 1e6:.2f} M | {row.attention_macs / 1e6:.2f} M "
            f"| {row.params / 1e6:.3f} M | {row.nonzero_params / 1e6:.3f} M |"
        )
    if any(r.speed for r in rows):
        lines += [
            "",
            "## Speed",
            "",
            "Timed side by side in this run; speed-ups are over the starting model.",
            "",
            speed_table(rows),
        ]
    else:
        lines += ["", "Speed was not measured (--skip-speed)."]
    if meta["engines_left_out"]:
        lines += [""] + [f"- {name} left out: {why}" for name, why in meta["engines_left_out"].items()]
    return "\n".join(lines) + "\n"
