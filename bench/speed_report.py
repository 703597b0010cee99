"""The report's speed summaries: each method against the best dense alternative, and which engine
accelerates which pruning pattern, both from the speed entries of one run."""

from __future__ import annotations

from .frontier import top1_text
from .schema import Row, SpeedEntry

DENSE = "dense"
ACCELERATES = 1.1  # a pattern counts as accelerated at this speed-up over the same engine's dense model
STRUCTURED = ("vtp", "head-channels")
MASK_PATTERNS = {"unstructured": "unstructured", "2:4": "N:M", "1x4": "1×4"}


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "–"


def _batches(rows: list[Row]) -> list[int]:
    return sorted({s.batch for r in rows for s in r.speed})


def _mask_pattern(pattern: str | None) -> str:
    if pattern is None:
        return "unstructured"
    return MASK_PATTERNS.get(pattern, "N:M" if ":" in pattern else pattern)


def speed_pattern(row: Row) -> str | None:
    """The pruning pattern a timed row stands for ('unstructured', 'N:M', '1×4', 'structured', 'tokens',
    'INT8', 'INT8 + 1×4', 'combined', ...); None for the dense model."""
    if row.method == DENSE:
        return None
    if row.method == "int8":
        base = row.settings.get("base")
        return "INT8" if base == DENSE else f"INT8 + {_mask_pattern(row.settings.get('pattern'))}"
    if row.method in STRUCTURED:
        return "structured" + (" + INT8" if "int8" in row.settings else "")
    if row.method == "token-drop":
        return "tokens" + (" + INT8" if "int8" in row.settings else "")
    if row.method == "combined":
        return "combined" + (" + INT8" if "int8" in row.settings.get("passes", []) else "")
    return _mask_pattern(row.settings.get("pattern"))


def best_dense_line(rows: list[Row]) -> str:
    """'batch 1: openvino int8 (12.3 ms); batch 16: …' — what every speed-up below is measured against."""
    parts = []
    for batch in _batches(rows):
        named = next((s for r in rows for s in r.speed if s.batch == batch and s.best_dense), None)
        if named is None:
            continue
        latency = named.latency_ms["p50"] * named.speedup_vs_best_dense
        parts.append(f"batch {batch}: **{named.best_dense}** ({latency:.2f} ms median)")
    return "; ".join(parts)


def engine_pattern_table(rows: list[Row]) -> str:
    """Pattern × engine: the best speed-up any row of the pattern has over the same engine's dense model,
    per batch size, ✓ where it reaches ACCELERATES at every batch size timed."""
    timed = [r for r in rows if r.speed and speed_pattern(r)]
    if not timed:
        return ""
    engines = sorted({s.engine for r in timed for s in r.speed})
    batches = _batches(timed)
    patterns = list(dict.fromkeys(speed_pattern(r) for r in timed))
    lines = ["| pattern | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    for pattern in patterns:
        cells = []
        for engine in engines:
            best = [max((s.speedup_vs_dense_same_engine for r in timed if speed_pattern(r) == pattern
                         for s in r.speed if s.engine == engine and s.batch == b
                         and s.speedup_vs_dense_same_engine is not None), default=None) for b in batches]
            if all(v is None for v in best):
                cells.append("–")
                continue
            mark = " ✓" if all(v is not None and v >= ACCELERATES for v in best) else ""
            cells.append(" / ".join(_x(v) for v in best) + mark)
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fastest(rows: list[Row], batch: int) -> SpeedEntry | None:
    """The entry with the lowest median latency among `rows` at `batch` (all on the speed model), whether
    or not dense PyTorch was timed beside it."""
    entries = [s for r in rows for s in r.speed if s.batch == batch]
    return min(entries, key=lambda s: s.latency_ms["p50"]) if entries else None


def lead_table(rows: list[Row]) -> str:
    """One line per setting timed (rows grouped by their profile entry): the fastest engine's speed-up over
    dense PyTorch and over the best dense alternative at each batch size, and the digits-vit top-1 of the
    same setting."""
    timed: dict[str, list[Row]] = {}
    for r in rows:
        if r.speed and r.entry is not None:
            timed.setdefault(r.entry, []).append(r)
    if not timed:
        return ""
    batches = _batches([r for group in timed.values() for r in group])
    accuracy = {r.entry: r for r in rows if r.model == "digits-vit" and r.top1 is not None and r.entry}
    dense = next((r for r in rows if r.model == "digits-vit" and r.method == DENSE and r.top1), None)
    header = " | ".join(f"batch {b}: fastest engine, vs dense torch, vs best dense" for b in batches)
    lines = [f"| setting | {header} | digits-vit top-1 |", "|---|" + "---|" * (len(batches) + 1)]
    if dense is not None:
        lines.append("| dense | " + " | ".join("–" for _ in batches) + f" | {top1_text(dense)} |")
    for entry, group in timed.items():
        cells = []
        for batch in batches:
            best = _fastest(group, batch)
            cells.append(f"{best.engine}, {_x(best.speedup_vs_dense_torch)}, "
                         f"**{_x(best.speedup_vs_best_dense)}**" if best else "–")
        lines.append(f"| `{entry}` | " + " | ".join(cells) + f" | {top1_text(accuracy.get(entry))} |")
    return "\n".join(lines)
