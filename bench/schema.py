"""results.json: the versioned record of one prune-and-bench run (documented in docs/results-schema.md).

{"schema": 12, "meta": {...}, "rows": [{"model", "method", "entry", "settings", "top1", "top1_oneshot",
 "top1_sparse_trained", "top1_seeds", "macs", "attention_macs", "params", "nonzero_params",
 "prune_seconds", "calibration_samples", "verification", "stages", "artifact", "speed": [{"engine",
 "batch", "items_per_sec", "latency_ms": {"mean", "p50", "p90", "p99"}, "speedup_vs_dense_torch",
 "speedup_vs_dense_same_engine", "fraction_of_supported_ops", "speedup_vs_best_dense",
 "best_dense", "speedup_vs_ort_int8", "int8_mac_share"}]}]}

Bump SCHEMA_VERSION whenever a field is added, renamed or changes meaning, and record what changed
in docs/results/results-schema-history.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 12


@dataclass
class SpeedEntry:
    """One engine at one batch size, measured in the same run as the dense baselines."""

    engine: str
    batch: int
    items_per_sec: float
    latency_ms: dict[str, float]
    speedup_vs_dense_torch: float | None = None
    speedup_vs_dense_same_engine: float | None = None
    fraction_of_supported_ops: float | None = None
    speedup_vs_best_dense: float | None = None  # over the fastest dense alternative at this batch size
    best_dense: str | None = None  # that alternative, e.g. "openvino int8"
    speedup_vs_ort_int8: float | None = None  # over dense INT8 (QDQ) on ONNX Runtime timed beside it
    int8_mac_share: float | None = None  # MACs run in INT8 / all MatMul, Gemm and Conv MACs (OpenVINO)


@dataclass
class Row:
    """One model under one method and settings; `top1` is None where a row measures speed only."""

    model: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    entry: str | None = None  # the profile entry that made it, e.g. "vtp=0.4"
    top1: float | None = None
    top1_oneshot: float | None = None
    top1_sparse_trained: float | None = None
    top1_seeds: list[float] | None = None
    macs: int | None = None
    attention_macs: int | None = None
    params: int | None = None
    nonzero_params: int | None = None
    prune_seconds: float | None = None
    calibration_samples: int | None = None
    verification: dict[str, dict[str, Any]] | None = None
    stages: list[dict[str, Any]] | None = None  # a staged recipe: each stage's name, epochs and top-1
    artifact: str | None = None
    speed: list[SpeedEntry] = field(default_factory=list)

    def label(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.method}({settings})" if settings else self.method


def results_document(meta: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "meta": meta, "rows": [asdict(r) for r in rows]}
