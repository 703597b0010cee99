"""Sparsity patterns: which sets of weights a mask may remove together.

Every pattern works on a 2-D view of a weight, (out_features, in_features) for a linear layer
and (out_channels, in_channels·kh·kw) for a convolution, so "along the input channel" means along
a row. A pattern turns per-weight scores (low = remove first) into a keep-mask:

- `unstructured`: any weight on its own.
- `N:M` (e.g. `2:4`): of every M consecutive weights in a row, keep the N with the highest
  scores, so the sparsity is fixed at 1 - N/M (the layout of NVIDIA's sparse tensor cores).
- `1xK` (e.g. `1x4`): whole blocks of K consecutive weights in a row, scored by their sum (the
  layout sparse INT8 kernels want: a block of 4 input channels is one VNNI dot product).

Scores of -inf mark weights that must go (already masked); a block holding one is removed whole.
"""

from __future__ import annotations

import re
from abc import ABC
from collections.abc import Callable

import torch

UNSTRUCTURED = "unstructured"


class Pattern(ABC):
    """A sparsity pattern; `unit` is how many consecutive row weights are removed together."""

    spec: str
    unit: int = 1

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """ValueError when a weight of `shape` (the 2-D view) cannot hold this pattern."""
        if len(shape) != 2:
            raise ValueError(f"{name}: patterns need a 2-D weight view, got shape {tuple(shape)}")

    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself sets (N:M), or None when it takes any sparsity."""
        return None

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows, cols) per-weight scores -> (rows, cols / unit) per-unit scores (sums)."""
        if self.unit == 1:
            return scores
        rows, cols = scores.shape
        return scores.reshape(rows, cols // self.unit, self.unit).sum(-1)

    def expand(self, unit_keep: torch.Tensor) -> torch.Tensor:
        """(rows, cols / unit) keep-mask -> (rows, cols) keep-mask."""
        return unit_keep if self.unit == 1 else unit_keep.repeat_interleave(self.unit, dim=1)

    def select(self, scores: torch.Tensor, prune_units: int) -> torch.Tensor:
        """Keep-mask (same shape as `scores`) removing the `prune_units` lowest-scoring units."""
        self.check_shape("scores", tuple(scores.shape))
        return self.expand(lowest_removed(self.unit_scores(scores), prune_units))

    def units_to_prune(self, shape: tuple[int, ...], sparsity: float) -> int:
        """How many units a (rows, cols) weight loses at `sparsity`: round(sparsity * units)."""
        return round(sparsity * shape[0] * (shape[1] // self.unit))

    def __repr__(self) -> str:
        return f"Pattern({self.spec!r})"


class Unstructured(Pattern):
    spec = UNSTRUCTURED


class RowBlocks(Pattern):
    """Blocks of `size` consecutive weights along the input channel, removed whole."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"block size must be >= 1, got {size}")
        self.unit, self.spec = size, f"1x{size}"

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        super().check_shape(name, shape)
        if shape[1] % self.unit:
            raise ValueError(f"{name}: pattern {self.spec} needs the input size to be a multiple of "
                             f"{self.unit}, got {shape[1]} (weight view {tuple(shape)})")


class NOfM(Pattern):
    """At most `n` non-zeros in every group of `m` consecutive weights of a row."""

    def __init__(self, n: int, m: int) -> None:
        if m < 1 or n < 1:
            raise ValueError(f"N:M needs N >= 1 and M >= 1, got {n}:{m}")
        if n > m:
            raise ValueError(f"N:M keeps N of every M weights, so N must not exceed M; got {n}:{m}")
        self.n, self.m, self.spec = n, m, f"{n}:{m}"

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        super().check_shape(name, shape)
        if shape[1] % self.m:
            raise ValueError(f"{name}: pattern {self.spec} needs the input size to be a multiple of "
                             f"{self.m}, got {shape[1]} (weight view {tuple(shape)})")

    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def units_to_prune(self, shape: tuple[int, ...], sparsity: float) -> int:
        return shape[0] * shape[1] // self.m * (self.m - self.n)

    def select(self, scores: torch.Tensor, prune_units: int | None = None) -> torch.Tensor:
        """Keep the N best of every M; `prune_units` is ignored (the pattern fixes the count)."""
        self.check_shape("scores", tuple(scores.shape))
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // self.m, self.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(groups, self.n, dim=-1, sorted=False).indices, True)
        return keep.reshape(rows, cols)


def lowest_removed(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Keep-mask of `scores`' shape with exactly `prune` lowest entries removed (ties: lowest index)."""
    if not 0 <= prune <= scores.numel():
        raise ValueError(f"cannot remove {prune} of {scores.numel()} entries")
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if prune:
        keep[torch.argsort(scores.flatten(), stable=True)[:prune]] = False
    return keep.view_as(scores)


_PARSERS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Pattern]]] = [
    (re.compile(r"unstructured"), lambda _: Unstructured()),
    (re.compile(r"(\d+):(\d+)"), lambda m: NOfM(int(m[1]), int(m[2]))),
    (re.compile(r"1[x×](\d+)"), lambda m: RowBlocks(int(m[1]))),
]


def parse_pattern(spec: str | Pattern) -> Pattern:
    """'unstructured', 'N:M' (e.g. '2:4') or '1xK' (e.g. '1x4') -> a Pattern; ValueError otherwise."""
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, str):
        for regex, build in _PARSERS:
            match = regex.fullmatch(spec.strip().lower())
            if match:
                return build(match)
    raise ValueError(f"unknown sparsity pattern {spec!r}; use 'unstructured', 'N:M' (e.g. '2:4') "
                     f"or '1xK' blocks along the input channel (e.g. '1x4')")


def weight_view(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D view patterns work on: (out, in) for linear, (out, in·kh·kw) for convolution."""
    return weight.reshape(weight.shape[0], -1)


def check_mask_pattern(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Whether a keep-mask obeys `pattern` (used by tests and by callers that accept given masks)."""
    view = weight_view(mask)
    rows, cols = view.shape
    if isinstance(pattern, NOfM):
        return bool((view.reshape(rows, cols // pattern.m, pattern.m).sum(-1) <= pattern.n).all())
    if pattern.unit > 1:
        blocks = view.reshape(rows, cols // pattern.unit, pattern.unit)
        return bool((blocks.all(-1) | ~blocks.any(-1)).all())
    return True
