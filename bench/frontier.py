"""Speed read next to accuracy: each timed row's digits-vit top-1 of the same setting, the combined
recipes' frontier table, and the Pareto plot (speed-up over the best dense alternative against top-1).

A speed row (the speed model) and an accuracy row (digits-vit) are the same setting when their
`setting_key`s are equal: the method and the settings that decide shapes and zeros, marked when the
row runs in INT8 (a speed twin in either format matches the digits-vit twin fine-tuned in INT8). Token
rows timed at a keep rate match no digits-vit row, which aims at a FLOPs ratio instead.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from vitsparse.runtime import parse_engine_spec

from .labels import combined_setting_label
from .plotting import pyplot, save_figure
from .schema import Row, SpeedEntry

DENSE, COMBINED, INT8, TORCH = "dense", "combined", "int8", "torch"
MASK_METHODS = ("magnitude", "obs-layerwise", "obs-fisher")


def float_form(row: Row) -> Row:
    """An INT8 twin's row as its float model's: the same settings without `int8`."""
    return replace(row, settings={k: v for k, v in row.settings.items() if k != INT8})


def setting_key(row: Row) -> tuple | None:
    """What makes two rows the same setting across models; None where no digits-vit row can match."""
    settings = row.settings
    if row.entry is not None:  # made by a profile entry: its digits-vit and speed rows share it
        return ("entry", row.entry)
    if row.method == DENSE:
        return (DENSE,)
    if row.method == COMBINED:
        return (COMBINED, combined_setting_label(settings))
    if "int8" in settings:  # an INT8 twin (the speed model's format, or digits-vit's "qat")
        float_key = setting_key(float_form(row))
        return None if float_key is None else (*float_key, INT8)
    if row.method in MASK_METHODS:
        return (row.method, settings.get("sparsity"), settings.get("pattern", "unstructured"))
    if row.method == "vtp":
        return ("vtp", settings.get("rate"), settings.get("multiple"))
    if row.method == "head-channels" and settings.get("variant", "full") == "full":
        return ("head-channels", settings.get("budget"))
    if row.method == "token-drop" and "target_ratio" in settings:  # digits-vit only: aims at a FLOPs ratio
        return ("token-drop", settings.get("mode"), settings["target_ratio"])
    if row.method == INT8:  # the masks' sparsity and pattern decide its speed, not who chose them
        sparsity = 0.0 if settings.get("base") == DENSE else settings.get("sparsity")
        return (INT8, sparsity, settings.get("pattern", "unstructured"))
    return None


def digits_top1(rows: list[Row]) -> dict[tuple, Row]:
    """The digits-vit accuracy rows by setting key."""
    return {key: r for r in rows if r.model == "digits-vit" and r.top1 is not None
            and (key := setting_key(r)) is not None}


def matching_accuracy(row: Row, accuracy: dict[tuple, Row]) -> Row | None:
    key = setting_key(row)
    return accuracy.get(key) if key is not None else None


def mean_and_error(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (None from a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def top1_text(row: Row | None) -> str:
    """'97.41 ± 0.30 %' (mean ± standard error over seeds) or '97.41 %'; '–' without a row."""
    if row is None or row.top1 is None:
        return "–"
    error = mean_and_error(row.top1_seeds)[1] if row.top1_seeds else None
    return f"{100 * row.top1:.2f}" + (f" ± {100 * error:.2f}" if error is not None else "") + " %"


def _best_on(row: Row, engine: str, batch: int) -> SpeedEntry | None:
    """The row's entry on `engine` ('openvino' covers its precision columns) at `batch`, fastest first."""
    entries = [s for s in row.speed if s.batch == batch and parse_engine_spec(s.engine)[0] == engine
               and s.speedup_vs_best_dense is not None]
    return max(entries, key=lambda s: s.speedup_vs_best_dense) if entries else None


def frontier_table(rows: list[Row]) -> str:
    """Each combined recipe: digits-vit top-1 (mean ± standard error), its distance to dense, fewer MACs
    on the speed model, and the speed-up over the best dense alternative per engine and batch size."""
    accuracy = digits_top1(rows)
    timed = [r for r in rows if r.method == COMBINED and r.speed]
    if not timed:
        return ""
    dense = accuracy.get((DENSE,))
    speed_dense = next((r for r in rows if r.method == DENSE and r.speed), None)
    batches = sorted({s.batch for r in timed for s in r.speed})
    engines = sorted({parse_engine_spec(s.engine)[0] for r in timed for s in r.speed if s.engine != TORCH})
    by_label: dict[str, list[Row]] = {}
    for r in timed:
        by_label.setdefault(combined_setting_label(r.settings), []).append(r)
    header = " | ".join(f"{e} b{b}" for e in engines for b in batches)
    lines = [f"| recipe | digits-vit top-1 | vs dense | fewer MACs | {header} |",
             "|---|---|---|---|" + "---|" * (len(engines) * len(batches))]
    for label, group in by_label.items():
        match = matching_accuracy(group[0], accuracy)
        versus = (f"{100 * (match.top1 - dense.top1):+.2f} pt" if match and dense else "–")
        fewer = (f"{100 * (1 - group[0].macs / speed_dense.macs):.1f} %"
                 if speed_dense and speed_dense.macs and group[0].macs else "–")
        cells = []
        for engine in engines:
            for batch in batches:
                best = [e for r in group if (e := _best_on(r, engine, batch))]
                top = max(best, key=lambda s: s.speedup_vs_best_dense) if best else None
                cells.append(f"{top.speedup_vs_best_dense:.2f}×" if top else "–")
        lines.append(f"| {label} | {top1_text(match)} | {versus} | {fewer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_points(rows: list[Row], batch: int) -> list[tuple[str, str, float, float, float | None]]:
    """(label, engine, speed-up over the best dense alternative, top-1, its standard error) for every
    timed row with a digits-vit row of the same setting, on each engine but PyTorch, at `batch`."""
    accuracy = digits_top1(rows)
    points = []
    for r in rows:
        match = matching_accuracy(r, accuracy) if r.speed and r.method != DENSE else None
        if match is None:
            continue
        error = mean_and_error(match.top1_seeds)[1] if match.top1_seeds else None
        label = r.entry or (combined_setting_label(r.settings) if r.method == COMBINED else r.label())
        for entry in r.speed:
            if entry.batch == batch and entry.engine != TORCH and entry.speedup_vs_best_dense is not None:
                points.append((label, entry.engine, entry.speedup_vs_best_dense, match.top1, error))
    return points


def _rightmost(points: list[tuple[str, str, float, float, float | None]]) -> dict[str, tuple[float, float]]:
    """Each setting's fastest point (x, top-1), where its code goes."""
    named: dict[str, tuple[float, float]] = {}
    for label, _, x, y, _ in points:
        if x > named.get(label, (0.0, 0.0))[0]:
            named[label] = (x, y)
    return named


def has_pareto_points(rows: list[Row]) -> bool:
    """Whether any speed row has a digits-vit row of the same setting to plot against (none when the
    accuracy stage was skipped)."""
    return any(pareto_points(rows, batch) for batch in {s.batch for r in rows for s in r.speed})


def plot_pareto(rows: list[Row], path: Path) -> None:
    """One panel per batch size: x = speed-up over the best dense alternative, y = digits-vit top-1, one
    marker per engine; dense at (1, its top-1); each setting numbered at its fastest point."""
    plt = pyplot()
    batches = sorted({s.batch for r in rows for s in r.speed})
    dense = digits_top1(rows).get((DENSE,))
    labels = dict.fromkeys(p[0] for batch in batches for p in pareto_points(rows, batch))
    codes = {label: str(number) for number, label in enumerate(labels, 1)}
    key = [f"{code}: {label}" for label, code in codes.items()]
    key_lines = ["      ".join(key[i:i + 2]) for i in range(0, len(key), 2)]  # two settings a line
    height = 5.0 + 0.14 * len(key_lines)
    fig, axes = plt.subplots(1, len(batches), figsize=(6.4 * len(batches), height), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        points = pareto_points(rows, batch)
        engines = sorted({p[1] for p in points})
        for index, engine in enumerate(engines):
            mine = [p for p in points if p[1] == engine]
            ax.errorbar([p[2] for p in mine], [100 * p[3] for p in mine],
                        yerr=[100 * (p[4] or 0) for p in mine], fmt="o^sDv"[index % 5], color=f"C{index}",
                        label=engine, capsize=2, linestyle="none")
        for label, (x, y) in _rightmost(points).items():  # each setting named once, by its code
            ax.annotate(codes[label], (x, 100 * y), xytext=(5, 2), textcoords="offset points", fontsize=8)
        if dense is not None:
            ax.scatter([1.0], [100 * dense.top1], marker="*", s=120, color="black", label="dense", zorder=3)
            ax.axhline(100 * dense.top1 - 1, color="grey", linestyle=":", linewidth=1, label="dense − 1 pt")
        ax.axvline(1.0, color="grey", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}×"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xticks([t for t in (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16)
                       if min(p[2] for p in points) / 1.2 <= t <= max(p[2] for p in points) * 1.2] or [1])
        ax.set_xlabel("speed-up over the best dense alternative (median latency, log scale)")
        ax.set_ylabel("digits-vit top-1, same setting (%)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, "\n".join(key_lines), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, (0.14 * len(key_lines) + 0.2) / height, 1, 1))
    save_figure(fig, path, layout=False)
