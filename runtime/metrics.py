"""Counters, gauges and histograms rendered in Prometheus' text exposition format (version 0.0.4).

A few dozen lines instead of a client library: the server's metrics are fixed, single-process and
updated from one event loop, so no locking or registry machinery is needed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metric:
    """One metric family: a name, help text, type, and one value (or bucket set) per label combination."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help_text = name, help_text
        self.values: dict[Labels, float] = {}

    def _key(self, labels: dict[str, object]) -> Labels:
        return tuple(sorted((key, str(value)) for key, value in labels.items()))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels(key)} {_number(value)}" for key, value in sorted(self.values.items())]
        return lines


class Counter(Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


class Gauge(Metric):
    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        self.values[self._key(labels)] = float(value)


class Histogram(Metric):
    """Cumulative buckets (`le`), `_sum` and `_count` per label combination."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]
        for key in sorted(self.counts):
            running = 0
            for bound, count in zip((*self.buckets, math.inf), self.counts[key], strict=True):
                running += count
                lines.append(f"{self.name}_bucket{_labels(key + (('le', _number(bound)),))} {running}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(self.sums[key])}")
            lines.append(f"{self.name}_count{_labels(key)} {running}")
        return lines


class ServerMetrics:
    """What `/metrics` reports: requests by route and status, errors, latency, batch sizes, queue depth."""

    def __init__(self) -> None:
        self.requests = Counter("vitsparse_requests_total", "HTTP requests answered, by route and status.")
        self.errors = Counter("vitsparse_request_errors_total",
                              "Requests answered with a 4xx or 5xx status, by route, status and error type.")
        self.latency = Histogram("vitsparse_request_duration_seconds",
                                 "Time from request received to response, by route.", LATENCY_BUCKETS)
        self.batch_size = Histogram("vitsparse_batch_size", "Items per engine call, by model.", BATCH_BUCKETS)
        self.engine_seconds = Histogram("vitsparse_engine_seconds", "Engine time per call, by model.",
                                        LATENCY_BUCKETS)
        self.queue_depth = Gauge("vitsparse_queue_depth", "Items waiting for the engine, by model.")
        self.families: list[Metric] = [self.requests, self.errors, self.latency, self.batch_size,
                                       self.engine_seconds, self.queue_depth]

    def render(self) -> str:
        return "\n".join(line for family in self.families for line in family.render()) + "\n"


def _labels(key: Labels) -> str:
    if not key:
        return ""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, value in key)
    return "{" + ",".join(f'{name}="{value}"' for (name, _), value in zip(key, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
