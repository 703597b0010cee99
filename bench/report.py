"""Turn measured rows into report.md, results.json, accuracy.png, head_channels.png and speedup.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .frontier import (
    MASK_METHODS,
    digits_top1,
    float_form,
    has_pareto_points,
    mean_and_error,
    plot_pareto,
    setting_key,
    top1_text,
)
from .labels import combined_setting_label
from .plotting import pyplot, save_figure
from .schema import Row, results_document
from .speed_report import best_dense_line, engine_pattern_table, lead_table

DENSE = "dense"


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f} %" if value is not None else "–"


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "–"


def _accuracy_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.top1 is not None or r.top1_oneshot is not None]


def accuracy_table(rows: list[Row]) -> str:
    """Every digits-vit accuracy row, one line each; empty when the run measured no accuracy."""
    measured = _accuracy_rows(rows)
    if not measured:
        return ""
    lines = [
        "| model | method | top-1 one-shot | top-1 fine-tuned | MACs | params | non-zero | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        seconds = f"{r.prune_seconds:.1f}" if r.prune_seconds is not None else "–"
        lines.append(
            f"| {r.model} | {r.label()} | {_pct(r.top1_oneshot)} | {_pct(r.top1)} | "
            f"{(r.macs or 0) / 1e6:.2f} M | {(r.params or 0) / 1e6:.3f} M | "
            f"{(r.nonzero_params or 0) / 1e6:.3f} M | {seconds} |"
        )
    return "\n".join(lines)


def sparsity_curves(rows: list[Row], key: str) -> dict[str, list[tuple[float, float]]]:
    """(sparsity, top-1) per method for `key` "top1" or "top1_oneshot", unstructured rows only."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in _accuracy_rows(rows):
        value = getattr(r, key)
        if (
            r.method in MASK_METHODS
            and "sparsity" in r.settings
            and value is not None
            and r.settings.get("pattern", "unstructured") == "unstructured"
        ):
            curves.setdefault(r.method, []).append((r.settings["sparsity"], value))
    return {m: sorted(points) for m, points in curves.items()}


def sparsity_table(rows: list[Row]) -> str:
    """Top-1 by sparsity (rows) and method (columns), one-shot / fine-tuned, plus the dense line."""
    oneshot, tuned = sparsity_curves(rows, "top1_oneshot"), sparsity_curves(rows, "top1")
    methods = list(tuned or oneshot)
    if not methods:
        return ""
    dense = next((r.top1 for r in rows if r.method == DENSE and r.top1 is not None), None)
    lines = [
        "| sparsity | " + " | ".join(f"{m} one-shot | {m} fine-tuned" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for sparsity in sorted({s for points in tuned.values() for s, _ in points}):
        cells = []
        for m in methods:
            cells += [
                _pct(dict(oneshot.get(m, [])).get(sparsity)),
                _pct(dict(tuned.get(m, [])).get(sparsity)),
            ]
        lines.append(f"| {sparsity:.0%} | " + " | ".join(cells) + " |")
    if dense is not None:
        lines.append(f"\nDense top-1: {_pct(dense)}.")
    return "\n".join(lines)


def vtp_table(rows: list[Row], method: str = "vtp") -> str:
    """Dimension slicing per model and rate: size, MACs and their reduction vs that model's dense row,
    and top-1 after sparse training, after slicing and after fine-tuning where measured."""
    sliced = [r for r in rows if r.method == method]
    if not sliced:
        return ""
    dense = {r.model: r for r in rows if r.method == DENSE and r.macs}
    lines = [
        "| model | settings | params | MACs | fewer MACs | top-1 sparse-trained | top-1 sliced | "
        "top-1 fine-tuned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sliced:
        base = dense.get(r.model)
        fewer = _pct(1 - r.macs / base.macs) if base and r.macs else "–"
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r.settings.items()))
        lines.append(
            f"| {r.model} | {settings} | {(r.params or 0) / 1e6:.3f} M | {(r.macs or 0) / 1e6:.1f} M | "
            f"{fewer} | {_pct(r.top1_sparse_trained)} | {_pct(r.top1_oneshot)} | {_pct(r.top1)} |"
        )
    return "\n".join(lines)


HEAD_CHANNELS = "head-channels"


def head_channel_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.method == HEAD_CHANNELS and r.top1 is not None]


def _points(value: float, error: float | None, sign: bool = False) -> str:
    text = f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"
    return text + (f" ± {100 * error:.2f}" if error is not None else "")


def paired_difference(row: Row, reference: Row | None) -> str:
    """`row` − `reference` fine-tuned top-1 seed by seed (the same seeds and data orders), mean ± its
    standard error, in points; "–" without per-seed figures for both."""
    if reference is None or row is reference or not row.top1_seeds or not reference.top1_seeds:
        return "–"
    if len(row.top1_seeds) != len(reference.top1_seeds):
        return "–"
    mean, error = mean_and_error([a - b for a, b in zip(row.top1_seeds, reference.top1_seeds, strict=True)])
    return _points(mean, error, sign=True) + " pt"


def head_channel_table(rows: list[Row]) -> str:
    """The head-equal channel method and its ablations per budget: fewer attention MACs vs the model's
    dense row, mean top-1 after the search, the slice and the fine-tune (± the standard error over
    seeds), and the fine-tuned difference to the plain-L1 ablation, paired seed by seed."""
    measured = head_channel_rows(rows)
    if not measured:
        return ""
    dense = {r.model: r for r in rows if r.method == DENSE and r.attention_macs}
    plain_l1 = {(r.model, r.settings.get("budget")): r for r in measured if r.settings.get("variant") == "l1"}
    lines = [
        "| budget | variant | fewer attention MACs | fewer MACs | top-1 searched | top-1 sliced | "
        "top-1 fine-tuned | vs dense | vs l1, paired | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(measured, key=lambda r: (r.settings.get("budget", 0), r.model)):
        base = dense.get(r.model)
        fewer_attention = (_pct(1 - r.attention_macs / base.attention_macs)
                           if base and r.attention_macs else "–")
        fewer = _pct(1 - r.macs / base.macs) if base and r.macs else "–"
        versus = f"{100 * (r.top1 - base.top1):+.2f} pt" if base and base.top1 is not None else "–"
        tuned = _points(*mean_and_error(r.top1_seeds)) + " %" if r.top1_seeds else _pct(r.top1)
        versus_l1 = paired_difference(r, plain_l1.get((r.model, r.settings.get("budget"))))
        lines.append(
            f"| {r.settings.get('budget', 0):.0%} | {r.settings.get('variant', '–')} | {fewer_attention} | "
            f"{fewer} | {_pct(r.top1_sparse_trained)} | {_pct(r.top1_oneshot)} | {tuned} | {versus} | "
            f"{versus_l1} | {len(r.top1_seeds or ()) or 1} |"
        )
    return "\n".join(lines)


TOKEN_DROP, COMBINED = "token-drop", "combined"


def token_drop_table(rows: list[Row]) -> str:
    """Token dropping on digits-vit per FLOPs ratio and mode: fewer MACs vs dense, the keep counts, top-1
    of the learned thresholds image by image, of the static counts, and fine-tuned (± standard error)."""
    measured = [r for r in rows if r.method == TOKEN_DROP and r.top1 is not None]
    if not measured:
        return ""
    dense = {r.model: r for r in rows if r.method == DENSE and r.macs}
    lines = [
        "| FLOPs target | mode | fewer MACs | keep rate | kept tokens | locations | top-1 adaptive | "
        "top-1 static | top-1 fine-tuned | vs dense | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(measured, key=lambda r: (-r.settings.get("target_ratio", 1), r.settings.get("mode", ""))):
        base, settings = dense.get(r.model), r.settings
        fewer = _pct(1 - r.macs / base.macs) if base and r.macs else "–"
        versus = f"{100 * (r.top1 - base.top1):+.2f} pt" if base and base.top1 is not None else "–"
        tuned = _points(*mean_and_error(r.top1_seeds)) + " %" if r.top1_seeds else _pct(r.top1)
        lines.append(
            f"| {settings.get('target_ratio', 1):.2f} | {settings.get('mode', '–')} | {fewer} | "
            f"{settings.get('keep_rate', '–')} | {settings.get('kept_tokens', '–')} | "
            f"{settings.get('locations', '–')} | {_pct(r.top1_sparse_trained)} | {_pct(r.top1_oneshot)} | "
            f"{tuned} | {versus} | {len(r.top1_seeds or ()) or 1} |"
        )
    return "\n".join(lines)


def _stages_text(row: Row) -> str:
    """'vtp 97.8 → head-channels 97.4 → ...': the mean top-1 after each stage of a staged recipe."""
    return " → ".join(f"{stage['stage']} {100 * stage['top1']:.1f}" for stage in row.stages or [])


def combined_table(rows: list[Row]) -> str:
    """The combined recipes on digits-vit: the setting, the training budget, top-1 after each stage,
    the final top-1 (mean ± standard error over seeds) against dense, fewer MACs and non-zero weights."""
    combined = [r for r in rows if r.method == COMBINED and r.top1 is not None]
    if not combined:
        return ""
    dense = {r.model: r for r in rows if r.method == DENSE and r.macs}
    lines = [
        "| setting | epochs | one-shot | top-1 after each stage | top-1 | vs dense | seeds | fewer MACs | "
        "non-zero weights | INT8 exports: same top-1 as torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in combined:
        base = dense.get(r.model)
        fewer = _pct(1 - r.macs / base.macs) if base and r.macs else "–"
        nonzero = _pct(r.nonzero_params / base.nonzero_params) if base and base.nonzero_params else "–"
        versus = f"{100 * (r.top1 - base.top1):+.2f} pt" if base and base.top1 is not None else "–"
        epochs = sum(stage["epochs"] for stage in r.stages or [])
        seeds = len(r.top1_seeds or ()) or 1
        lines.append(f"| {combined_setting_label(r.settings)} | {epochs or '–'} | {_pct(r.top1_oneshot)} | "
                     f"{_stages_text(r) or '–'} | {top1_text(r)} | {versus} | {seeds} | {fewer} | "
                     f"{nonzero} | {_agreements(r)} |")
    return "\n".join(lines)


def _agreements(row: Row) -> str:
    """'onnxruntime 100.00 %, openvino 99.63 %': each INT8 export's top-1 agreement with torch."""
    checks = (row.verification or {}).values()
    return ", ".join(f"{c['engine']} {_pct(c['top1_agreement'])}" for c in checks) or "–"


def plot_head_channels(rows: list[Row], path: Path) -> None:
    """Fine-tuned top-1 per variant, one group of bars per budget (mean), each seed as a dot."""
    plt = pyplot()
    measured = head_channel_rows(rows)
    budgets = sorted({r.settings["budget"] for r in measured})
    variants = list(dict.fromkeys(r.settings["variant"] for r in measured))
    dense = next((r.top1 for r in rows if r.method == DENSE and r.model == measured[0].model), None)
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    width = 0.8 / len(variants)
    for v_index, variant in enumerate(variants):
        for b_index, budget in enumerate(budgets):
            row = next((r for r in measured if r.settings == {"budget": budget, "variant": variant}), None)
            if row is None:
                continue
            x = b_index + v_index * width
            ax.bar(x, 100 * row.top1, width, color=f"C{v_index}", label=variant if b_index == 0 else None)
            seeds = row.top1_seeds or ()
            ax.scatter([x] * len(seeds), [100 * t for t in seeds], color="black", s=10, zorder=3)
    if dense is not None:
        ax.axhline(100 * dense, color="grey", linewidth=1, label="dense")
        ax.set_ylim(max(0.0, 100 * dense - 6), min(100.0, 100 * dense + 2))
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(budgets))])
    ax.set_xticklabels([f"{b:.0%} fewer attention MACs" for b in budgets])
    ax.set_ylabel(f"top-1 on {measured[0].model} test after fine-tuning (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


INT8 = "int8"


def _agreement(row: Row, form: str) -> str:
    check = (row.verification or {}).get(form)
    if not check:
        return "–"
    return f"{check['max_abs_logit_diff']:.3f} / {_pct(check['top1_agreement'])} ({check['engine']})"


def _float_counterpart(row: Row, accuracy: dict[tuple, Row]) -> Row | None:
    """The float digits-vit row an INT8 row was quantized from: its twin's float row, or the dense or
    masked row of the INT8 method's base."""
    if row.method != INT8:
        return accuracy.get(setting_key(float_form(row)) or ())
    base = row.settings.get("base")
    masks = {k: row.settings[k] for k in ("sparsity", "pattern") if k in row.settings}
    return accuracy.get(setting_key(Row(row.model, base, {} if base == DENSE else masks)) or ())


def int8_table(rows: list[Row]) -> str:
    """digits-vit INT8 (dense, masked, and the structured and token twins): top-1 after calibration and
    after quantization-aware training, against the float model it came from and dense FP32, and how
    each export format agrees with the fake-quantized torch model on the test images."""
    measured = [r for r in rows if is_int8_row(r) and r.method != COMBINED and r.top1 is not None]
    if not measured:
        return ""
    accuracy = digits_top1(rows)
    dense = accuracy.get((DENSE,))
    lines = ["| model | INT8 post-training | INT8 after QAT | float model | QAT vs dense FP32 (relative) | "
             "QDQ: max Δlogit / same top-1 | QDQ on OpenVINO | operator: max Δlogit / same top-1 | "
             "sparse kernels (openvino-sparse) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
        relative = f"{100 * (r.top1 / dense.top1 - 1):+.2f} %" if dense else "–"
        source = _float_counterpart(r, accuracy)
        lines.append(f"| {_int8_model(r)} | {_pct(r.top1_oneshot)} | {_pct(r.top1)} | "
                     f"{_pct(source.top1 if source else None)} | {relative} | {_agreement(r, 'qdq')} | "
                     f"{_agreement(r, 'qdq-openvino')} | {_agreement(r, 'operator')} | "
                     f"{_agreement(r, 'sparse-kernels')} |")
    return "\n".join(lines)


def is_int8_row(row: Row) -> bool:
    """A row timed as an INT8 file: the int8 method's, or another method's INT8 twin."""
    return row.method == INT8 or "int8" in row.settings or "int8" in row.settings.get("passes", [])


def _int8_model(row: Row) -> str:
    """What an INT8 row quantizes, in a few words: 'dense', '90.00 % unstructured', 'vtp 0.4', ..."""
    if row.method == INT8:
        base, settings = row.settings.get("base"), row.settings
        return base if base == DENSE else f"{base} {_pct(settings.get('sparsity'))} {settings.get('pattern')}"
    if row.method == COMBINED:
        return f"combined: {combined_setting_label(row.settings)}"
    settings = ", ".join(f"{k}={v}" for k, v in sorted(row.settings.items()) if k != "int8")
    return f"{row.method} {settings}"


def _share(value: float | None) -> str:
    return f"{100 * value:.1f} %" if value is not None else "–"


def int8_speed_table(rows: list[Row]) -> str:
    """Each timed INT8 model at each batch: its engine, median latency, its speed-up over dense PyTorch,
    over dense INT8 on ONNX Runtime and over the best dense alternative (each over the baselines timed
    in the same group), and the share of its MACs OpenVINO ran in INT8."""
    timed = [r for r in rows if is_int8_row(r) and r.speed]
    if not timed:
        return ""
    lines = ["| model | format | engine | batch | p50 ms | vs dense torch | vs dense INT8 on ONNX Runtime | "
             "vs best dense | MACs in INT8 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        form = r.settings.get("format") or r.settings.get("int8") or "operator"
        for s in sorted(r.speed, key=lambda s: (s.batch, s.engine)):
            lines.append(f"| {_int8_model(r)} | {form} | {s.engine} | {s.batch} | "
                         f"{s.latency_ms['p50']:.2f} | {_x(s.speedup_vs_dense_torch)} | "
                         f"{_x(s.speedup_vs_ort_int8)} | {_x(s.speedup_vs_best_dense)} | "
                         f"{_share(s.int8_mac_share)} |")
    return "\n".join(lines)


def solver_table(rows: list[Row]) -> str:
    """How long each data-aware solver took on the speed model (its rows have no top-1)."""
    timed = [r for r in rows if r.prune_seconds is not None and r.top1 is None]
    if not timed:
        return ""
    lines = ["| model | method | calibration images | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.model} | {r.label()} | {r.calibration_samples} | {r.prune_seconds:.1f} |" for r in timed]
    return "\n".join(lines)


def speed_table(rows: list[Row]) -> str:
    lines = [
        "| model | method | engine | batch | items/s | p50 ms | p99 ms | vs dense torch | "
        "vs dense same engine | vs best dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for s in sorted(r.speed, key=lambda s: (s.batch, s.engine)):
            lines.append(
                f"| {r.model} | {r.label()} | {s.engine} | {s.batch} | {s.items_per_sec:.1f} | "
                f"{s.latency_ms['p50']:.2f} | {s.latency_ms['p99']:.2f} | "
                f"{_x(s.speedup_vs_dense_torch)} | {_x(s.speedup_vs_dense_same_engine)} | "
                f"{_x(s.speedup_vs_best_dense)} |"
            )
    return "\n".join(lines)


def _kernel_threshold_note(thresholds: dict[str, float] | None) -> str:
    """Why a model has no openvino-sparse figures: none of its layers reaches this CPU's threshold."""
    if not thresholds:
        return ""
    return (f" openvino-sparse times a model only where a layer reaches this CPU's sparse-kernel threshold "
            f"({thresholds['int8']:.0%} all-zero 1×4 blocks in INT8, {thresholds['f32']:.0%} zeros in f32); "
            f"without one, the export keeps every layer dense and the model would run as on openvino.")


def _cpu_note(meta: dict[str, Any]) -> str:
    """"; AMD EPYC, flags avx2 avx512f ...": the CPU and the flags the kernels and engines choose by, so
    that a report says which CPU its speeds belong to (the VM's CPU changes between runs)."""
    model, flags = meta.get("cpu_model"), meta.get("cpu_flags")
    parts = ([model] if model else []) + ([f"flags {' '.join(flags)}"] if flags else [])
    return "".join(f"; {part}" for part in parts)


def markdown_report(meta: dict[str, Any], rows: list[Row]) -> str:
    """The lead table, then each method's section (one per spec, in registry order), then what every row
    measured and what the run left out."""
    from .registry import SPECS  # the specs import this module's tables

    sections = [
        f"# prune-and-bench, profile `{meta['profile']}`",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_cores']} cores{_cpu_note(meta)}), "
        f"{meta['wall_s']:.0f} s, "
        f"peak memory {meta['peak_rss_mb'] / 1024:.1f} GiB. Speed model: {meta['speed_model']}, weights "
        f"{meta['speed_weights']}. All speeds come from this one run, engines timed in alternating blocks."
        + "".join(f" No {name} columns: {why}." for name, why in meta.get("engines_left_out", {}).items())
        + _kernel_threshold_note(meta.get("sparse_kernel_thresholds")),
        _lead_section(rows),
    ]
    seen: set[str] = set()
    for spec in SPECS.values():
        key = spec.section or spec.name
        if key not in seen:
            seen.add(key)
            sections.append(spec.report_section(rows, meta))
    accuracy = accuracy_table(rows)
    if accuracy:
        sections.append("## Every accuracy row\n\n" + accuracy)
    patterns = engine_pattern_table(rows)
    if patterns:
        sections.append(
            "## Which engine accelerates which pattern\n\nFor each pattern, the best speed-up any of its "
            "rows has over the same engine's dense FP32 model (median latency), batch sizes "
            "left to right; ✓ where it is at least 1.1× at every batch size. INT8 rows are the "
            "file each engine runs as INT8 (QDQ on ONNX Runtime and OpenVINO, the operator format on "
            "DeepSparse); PyTorch runs masks as dense weights.\n\n" + patterns)
    if any(r.speed for r in rows):
        sections.append("## Speed\n\n" + speed_table(rows))
    sections.append("MACs are multiply-accumulates per image (what DeiT/timm call FLOPs).")
    sections.append(_left_out_section(meta))
    return "\n\n".join(s for s in sections if s) + "\n"


def _lead_section(rows: list[Row]) -> str:
    table = lead_table(rows)
    if not table:
        return ""
    return ("## Summary\n\nPer setting run: the fastest engine's speed-up on the speed model over dense "
            "PyTorch and over the best dense alternative (median latency, this run), and the digits-vit "
            "top-1 of the same setting. `pareto.png` plots the last column against the speed-up over the "
            "best dense alternative. Best dense alternative: " + (best_dense_line(rows) or "none timed")
            + ".\n\n" + table)


def _left_out_section(meta: dict[str, Any]) -> str:
    missing = meta.get("left_out") or []
    if not missing:
        return ""
    return ("## Left out\n\nThe full profile's settings this run did not run; each is one `--only` away "
            "(`vitsparse prune-and-bench --only vtp=0.2`), all of them with `--profile full`:\n\n"
            + ", ".join(f"`{label}`" for label in missing) + ".")


def plot_accuracy(rows: list[Row], path: Path) -> None:
    """Top-1 vs sparsity, one colour per method: solid after fine-tuning, dashed one-shot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = next((r.top1 for r in rows if r.method == DENSE and r.top1 is not None), None)
    oneshot = sparsity_curves(rows, "top1_oneshot")
    for index, (method, points) in enumerate(sorted(sparsity_curves(rows, "top1").items())):
        colour = f"C{index}"
        xs, ys = zip(*points, strict=True)
        ax.plot(
            [100 * x for x in xs],
            [100 * y for y in ys],
            marker="o",
            color=colour,
            label=f"{method}, fine-tuned",
        )
        if oneshot.get(method):
            xs, ys = zip(*oneshot[method], strict=True)
            ax.plot(
                [100 * x for x in xs],
                [100 * y for y in ys],
                marker="x",
                linestyle="--",
                color=colour,
                label=f"{method}, one-shot",
            )
    if dense is not None:
        ax.axhline(100 * dense, color="grey", linewidth=1, label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("top-1 on digits-vit test (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_speedup(rows: list[Row], path: Path) -> None:
    """Speed-up over dense PyTorch per timed row (dense first), one bar per engine, one panel per batch,
    the best dense alternative as a dashed line."""
    plt = pyplot()
    pruned = [r for r in rows if r.speed]
    batches = sorted({s.batch for r in pruned for s in r.speed})
    engines = sorted({s.engine for r in pruned for s in r.speed})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.8 * len(batches), 4.4), squeeze=False)
    width = 0.8 / max(len(engines), 1)
    for ax, batch in zip(axes[0], batches, strict=True):
        for e_index, engine in enumerate(engines):
            values = [
                next(
                    (
                        s.speedup_vs_dense_torch or 0
                        for s in r.speed
                        if s.engine == engine and s.batch == batch
                    ),
                    0,
                )
                for r in pruned
            ]
            ax.bar([i + e_index * width for i in range(len(pruned))], values, width, label=engine)
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(pruned))])
        ax.set_xticklabels(
            [_tick_label(r) for r in pruned],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.axhline(1.0, color="grey", linewidth=1)
        best = _best_dense_vs_torch(pruned, batch)
        if best:
            ax.axhline(best[1], color="black", linestyle="--", linewidth=1,
                       label=f"best dense alternative ({best[0]})")
            ax.legend(fontsize=7)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("speed-up vs dense PyTorch (median latency)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def _tick_label(row: Row) -> str:
    """A short bar label: the method and its scalar settings (lists such as passes left out)."""
    if row.method == COMBINED:
        return "combined + int8" if "int8" in row.settings.get("passes", []) else "combined"
    values = [str(v) for _, v in sorted(row.settings.items()) if not isinstance(v, (list, tuple))]
    return f"{row.method} {', '.join(values)}".strip()


def _best_dense_vs_torch(rows: list[Row], batch: int) -> tuple[str, float] | None:
    """The best dense alternative at `batch` and its speed-up over dense PyTorch (torch / its latency)."""
    for entry in (s for r in rows for s in r.speed if s.batch == batch):
        if entry.best_dense and entry.speedup_vs_dense_torch and entry.speedup_vs_best_dense:
            return entry.best_dense, entry.speedup_vs_dense_torch / entry.speedup_vs_best_dense
    return None


def write_report(directory: Path, meta: dict[str, Any], rows: list[Row]) -> dict[str, Path]:
    """Write the report files into `directory` (each via a temp file and rename)."""
    from .registry import SPECS

    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[str, Any]] = {
        "results": (
            "results.json",
            lambda p: p.write_text(
                json.dumps(results_document(meta, rows), indent=2) + "\n", encoding="utf-8"
            ),
        ),
        "report": ("report.md", lambda p: p.write_text(markdown_report(meta, rows), encoding="utf-8")),
    }
    for spec in SPECS.values():
        for name, write in spec.plots(rows).items():
            files.setdefault(name.removesuffix(".png"), (name, write))
    if any(r.speed and r.method != DENSE for r in rows):
        files["speed_plot"] = ("speedup.png", lambda p: plot_speedup(rows, p))
    if has_pareto_points(rows):
        files["pareto_plot"] = ("pareto.png", lambda p: plot_pareto(rows, p))
    return write_files_atomically(directory, files)


def write_files_atomically(directory: Path, files: dict[str, tuple[str, Any]]) -> dict[str, Path]:
    """`files` maps a key to (file name, writer of a path); each is written to a temp file, then renamed."""
    from vitsparse.runtime.atomic import atomic_path

    written = {}
    for key, (name, write) in files.items():
        with atomic_path(directory / name) as tmp:
            write(tmp)
        written[key] = directory / name
    return written
