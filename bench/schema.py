"""results.json: the versioned record of one prune-and-bench run (documented in README).

{"schema": 10, "meta": {...}, "rows": [{"model", "method", "entry", "settings", "top1", "top1_oneshot",
 "top1_sparse_trained", "top1_seeds", "macs", "attention_macs", "params", "nonzero_params",
 "prune_seconds", "calibration_samples", "verification", "stages", "artifact", "speed": [{"engine",
 "batch", "items_per_sec", "latency_ms": {"mean", "p50", "p90", "p99"}, "speedup_vs_dense_torch",
 "speedup_vs_dense_same_engine", "fraction_of_supported_ops", "speedup_vs_best_dense",
 "best_dense", "speedup_vs_ort_int8", "int8_mac_share"}]}]}

Schema 2 added `prune_seconds` (how long choosing the masks took) and `calibration_samples`;
schema 3 added `top1_sparse_trained` (VTP: top-1 of the gated model after sparse training, before
slicing; `top1_oneshot` is then the sliced model before fine-tuning); schema 4 added `attention_macs`
(qkv, attention matmuls and proj of every block, per image) and `top1_seeds` (the fine-tuned top-1 of
each seed where a row's top-1 figures are means over seeds: head-channels); schema 5 added
`verification` (int8 rows on digits-vit: per export format, the engine that ran it, the images, the
largest logit difference to the float model and the share of images with the same top-1); schema 6
added `speedup_vs_best_dense` and `best_dense` to speed entries: the speed-up over the fastest dense
alternative timed in the run at that batch size (dense PyTorch, ONNX Runtime or OpenVINO, in float or
as a QDQ INT8 file; DeepSparse, vitsparse's own engine, is not one), and which it was; schema 7
added `speedup_vs_ort_int8`: the speed-up over dense INT8 (QDQ) on ONNX Runtime in the same timing
group (the INT8 table had divided by the first group's timing); schema 8 added `int8_mac_share`: the
share of the file's MatMul/Gemm/Conv MACs the engine ran in INT8, read from OpenVINO's executed graph
(None on engines that do not say), and rows `stages`: for a combined recipe trained stage by stage on
digits-vit, each stage's `stage`, `epochs`, `top1` (mean over seeds) and `top1_seeds`; schema 9
compares `verification` with the fake-quantized torch model (the INT8 model itself) instead of the float
model before quantization, and adds digits-vit INT8 twins: VTP, head-channel and token rows whose
settings gain `int8: "qat"`; schema 10 adds rows' `entry`: the profile entry that made the row
(`vtp=0.4`, `combined=recipes/combined.yaml+int8`), shared by a setting's digits-vit and speed rows, and
meta `entries`, `left_out` (the full profile's entries the run left out), `wall_s` and `peak_rss_mb`
(`duration_s` and `speed_method` are gone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 10


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
