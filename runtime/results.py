"""What a benchmark reports: throughput and latency percentiles, as a dataclass that becomes JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and p50/p90/p99 of per-call latencies, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    summary = {"mean": float(ms.mean())}
    values = np.percentile(ms, PERCENTILES)
    summary.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)})
    return summary


@dataclass
class BenchmarkResult:
    """One engine (or runner) timed in one scenario: calls made, items/sec and latency in ms.

    `items_per_sec` counts items (batch_size per call) over the timed wall-clock `seconds`;
    `block_items_per_sec` holds one figure per timed block when a side-by-side run has several.
    """

    engine: str
    batch_size: int
    scenario: str
    num_streams: int
    iterations: int
    seconds: float
    items_per_sec: float
    latency_ms: dict[str, float]
    model: str | None = None
    num_cores: int | None = None
    fraction_of_supported_ops: float | None = None
    precision: str | None = None  # the float layers' precision the engine compiled for
    block_items_per_sec: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """Two human lines: throughput and latency percentiles."""
        lat = self.latency_ms
        fraction = ("" if self.fraction_of_supported_ops is None
                    else f", fraction_of_supported_ops={self.fraction_of_supported_ops:.4f}")
        precision = f", {self.precision}" if self.precision else ""
        return (f"{self.engine} ({self.scenario}, batch {self.batch_size}, {self.num_streams} stream(s), "
                f"cores={self.num_cores or 'all'}{precision}{fraction})\n"
                f"  {self.items_per_sec:.1f} items/sec over {self.iterations} calls in {self.seconds:.2f} s; "
                f"latency ms: mean {lat['mean']:.3f}, p50 {lat['p50']:.3f}, p90 {lat['p90']:.3f}, "
                f"p99 {lat['p99']:.3f}")
