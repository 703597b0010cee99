"""Activation range observers for static INT8: min/max, a percentile, or the range of least error.

Calibration runs twice over the images: the first pass finds each site's min and max, the second
fills a histogram over that span, from which `percentile` and `mse` choose a clipped range. Ranges
always include 0, so a zero activation (padding, a ReLU's floor) is represented exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QMIN, QMAX = 0, 255  # asymmetric UINT8 activations
SYMMETRIC_ZERO_POINT = 128  # UINT8 codes shifted by 128: signed INT8


@dataclass
class RangeStats:
    """What calibration saw at one site: its span, then a histogram over that span."""

    low: float = float("inf")
    high: float = float("-inf")
    histogram: torch.Tensor | None = None

    def observe_span(self, values: torch.Tensor) -> None:
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def observe_histogram(self, values: torch.Tensor, bins: int) -> None:
        counts = torch.histc(values.float().flatten(), bins=bins, min=self.low, max=self.high).double()
        self.histogram = counts if self.histogram is None else self.histogram + counts

    def bin_centres(self) -> torch.Tensor:
        bins = self.histogram.numel()
        width = (self.high - self.low) / bins
        return self.low + width * (torch.arange(bins, dtype=torch.float64) + 0.5)


Observer = Callable[[RangeStats, float], tuple[float, float]]
OBSERVERS: dict[str, Observer] = {}
NEEDS_HISTOGRAM = {"percentile", "mse"}


def register_observer(name: str) -> Callable[[Observer], Observer]:
    def add(observer: Observer) -> Observer:
        OBSERVERS[name] = observer
        return observer
    return add


@register_observer("minmax")
def minmax_range(stats: RangeStats, percentile: float) -> tuple[float, float]:
    """Everything calibration saw, outliers included."""
    return stats.low, stats.high


@register_observer("percentile")
def percentile_range(stats: RangeStats, percentile: float) -> tuple[float, float]:
    """Clip each tail at (100 − percentile) % of the values (99.99: the rarest 0.01 % each side)."""
    cumulative = stats.histogram.cumsum(0) / stats.histogram.sum()
    tail = (100.0 - percentile) / 100.0
    centres = stats.bin_centres()
    low_bin = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))
    high_bin = int(torch.searchsorted(cumulative, torch.tensor(1.0 - tail, dtype=torch.float64)))
    last = centres.numel() - 1
    return float(centres[min(low_bin, last)]), float(centres[min(high_bin, last)])


@register_observer("mse")
def mse_range(stats: RangeStats, percentile: float, steps: int = 24) -> tuple[float, float]:
    """The clipped range (each end shrunk independently, down to 20 %) whose UINT8 rounding and
    clipping error over the histogram is least."""
    centres, counts = stats.bin_centres(), stats.histogram
    shrink = torch.linspace(0.2, 1.0, steps, dtype=torch.float64)
    lows = (min(stats.low, 0.0) * shrink)[:, None].expand(steps, steps).flatten()
    highs = (max(stats.high, 0.0) * shrink)[None, :].expand(steps, steps).flatten()
    scale = ((highs - lows) / (QMAX - QMIN)).clamp_min(1e-12)[:, None]
    zero_point = (-lows[:, None] / scale).round().clamp(QMIN, QMAX)
    quantized = ((centres[None, :] / scale).round() + zero_point).clamp(QMIN, QMAX)
    error = ((centres[None, :] - (quantized - zero_point) * scale) ** 2 * counts[None, :]).sum(1)
    best = int(error.argmin())
    return float(lows[best]), float(highs[best])


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """UINT8 scale and zero point for the range [low, high], widened to include 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (QMAX - QMIN)
    if scale <= 0:  # a site that only ever saw zeros
        return 1.0, 0
    zero_point = int(min(max(round(-low / scale), QMIN), QMAX))
    return float(scale), zero_point


def symmetric_qparams(low: float, high: float) -> tuple[float, int]:
    """UINT8 scale and zero point 128 for a range centred on 0 that holds [low, high]: codes stand for
    -128 … 127 steps, the signed INT8 grid OpenVINO's INT8 attention needs from its inputs."""
    largest = max(-low, high, 0.0)
    if largest <= 0:  # a site that only ever saw zeros
        return 1.0, SYMMETRIC_ZERO_POINT
    return float(largest / (QMAX - SYMMETRIC_ZERO_POINT)), SYMMETRIC_ZERO_POINT
