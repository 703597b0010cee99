"""Turn measured rows into report.md, results.json and speedup.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .schema import Row, results_document


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f} %" if value is not None else "–"


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "–"


def accuracy_table(rows: list[Row]) -> str:
    lines = [
        "| model | method | top-1 one-shot | top-1 fine-tuned | MACs | params | non-zero |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.top1 is None and r.top1_oneshot is None:
            continue
        lines.append(
            f"| {r.model} | {r.label()} | {_pct(r.top1_oneshot)} | {_pct(r.top1)} | "
            f"{(r.macs or 0) / 1e6:.2f} M | {(r.params or 0) / 1e6:.3f} M | "
            f"{(r.nonzero_params or 0) / 1e6:.3f} M |"
        )
    return "\n".join(lines)


def speed_table(rows: list[Row]) -> str:
    lines = [
        "| model | method | engine | batch | items/s | p50 ms | p99 ms | vs dense torch | "
        "vs dense same engine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for s in sorted(r.speed, key=lambda s: (s.batch, s.engine)):
            lines.append(
                f"| {r.model} | {r.label()} | {s.engine} | {s.batch} | {s.items_per_sec:.1f} | "
                f"{s.latency_ms['p50']:.2f} | {s.latency_ms['p99']:.2f} | "
                f"{_x(s.speedup_vs_dense_torch)} | {_x(s.speedup_vs_dense_same_engine)} |"
            )
    return "\n".join(lines)


def markdown_report(meta: dict[str, Any], rows: list[Row]) -> str:
    weights = meta.get("speed_weights", "random")
    return (
        "\n\n".join(
            [
                f"# prune-and-bench, profile `{meta['profile']}`",
                f"Run {meta['date']} on {meta['machine']} ({meta['cpu_cores']} cores), "
                f"{meta['duration_s']:.0f} s. Speed model weights: {weights}. All speeds come from this "
                "one run, engines timed in alternating blocks.",
                "## Accuracy\n\n" + accuracy_table(rows),
                "## Speed\n\n" + speed_table(rows),
                "MACs are multiply-accumulates per image (what DeiT/timm call FLOPs).",
            ]
        )
        + "\n"
    )


def _method_key(row: Row) -> tuple[str, str]:
    return row.method, json.dumps(row.settings, sort_keys=True)


def speedup_points(rows: list[Row], engine: str = "deepsparse", batch: int = 1
                   ) -> dict[str, list[tuple[float, float, str]]]:
    """(top-1 %, speed-up vs dense torch, settings label) per method: accuracy from the accuracy rows,
    speed from the speed rows with the same method and settings."""
    accuracy = {_method_key(r): r.top1 for r in rows if r.top1 is not None}
    points: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        top1 = accuracy.get(_method_key(r))
        entry = next((s for s in r.speed if s.engine == engine and s.batch == batch), None)
        if top1 is not None and entry is not None and entry.speedup_vs_dense_torch is not None:
            label = ", ".join(str(v) for v in r.settings.values())
            points.setdefault(r.method, []).append((100 * top1, entry.speedup_vs_dense_torch, label))
    return points


def plot_speedup(points: dict[str, list[tuple[float, float, str]]], path: Path, engine: str = "deepsparse",
                 batch: int = 1) -> None:
    """Draw speed-up vs top-1, one line per method, as a PNG at `path` (any file name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, pts in sorted(points.items()):
        xs, ys, labels = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, text in zip(xs, ys, labels, strict=True):
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("top-1 on digits-vit (%)")
    ax.set_ylabel(f"speed-up vs dense PyTorch ({engine}, batch {batch})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(directory: Path, meta: dict[str, Any], rows: list[Row]) -> dict[str, Path]:
    """Write the three report files into `directory` (each via a temp file and rename)."""
    from vitsparse.compiler.recipe import atomic_path

    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    with atomic_path(directory / "results.json") as tmp:
        tmp.write_text(json.dumps(results_document(meta, rows), indent=2) + "\n", encoding="utf-8")
    written["results"] = directory / "results.json"
    with atomic_path(directory / "report.md") as tmp:
        tmp.write_text(markdown_report(meta, rows), encoding="utf-8")
    written["report"] = directory / "report.md"
    points = speedup_points(rows)
    if points:  # nothing to pair when accuracy or speed rows were skipped
        with atomic_path(directory / "speedup.png") as tmp:
            plot_speedup(points, tmp)
        written["plot"] = directory / "speedup.png"
    return written
