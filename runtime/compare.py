"""Time several runners side by side, fairly, on a shared machine.

Each runner is timed in a block of consecutive calls after its own warm-up, runners alternating
across rounds (the starting runner rotates each round), so an idle engine's spinning thread pool
never competes with the one being timed: timing several live engines call by call in turn distorts
DeepSparse by up to 2x. A runner is any zero-argument callable that runs one batch (an engine's
`run` bound to its inputs, or dense PyTorch wrapped by the caller), so this module needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .benchmark import summarize
from .errors import RuntimeInputError
from .results import BenchmarkResult
from .timing import Budget, Call, timed_calls

Runner = Callable[[], object]


def compare_side_by_side(runners: Mapping[str, Runner], *, batch_size: int, rounds: int = 3,
                         seconds_per_block: float = 1.0, warmup: float = 0.5,
                         on_block: Callable[[str], None] | None = None) -> dict[str, BenchmarkResult]:
    """Time each runner in `rounds` blocks of `seconds_per_block` (after `warmup` seconds of its own).

    Returns one sync result per runner, in the given order, with every block's items/sec in
    `block_items_per_sec` and latencies pooled over all blocks. `on_block(name)` hears of each block
    timed (a progress bar's tick).
    """
    _check(runners, batch_size=batch_size, rounds=rounds, seconds_per_block=seconds_per_block, warmup=warmup)
    names = list(runners)
    timed: dict[str, list[list[Call]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            timed_calls(runners[name], Budget(seconds=warmup))
            timed[name].append(timed_calls(runners[name], Budget(seconds=seconds_per_block)))
            if on_block is not None:
                on_block(name)
    return {name: _pool(name, timed[name], batch_size) for name in names}


def _pool(name: str, blocks: list[list[Call]], batch_size: int) -> BenchmarkResult:
    """One result from several timed blocks: items over the sum of the blocks' times, all latencies."""
    per_block = [summarize(calls, name=name, batch_size=batch_size, scenario="sync", num_streams=1)
                 for calls in blocks]
    pooled = summarize([call for calls in blocks for call in calls], name=name, batch_size=batch_size,
                       scenario="sync", num_streams=1)
    pooled.seconds = sum(block.seconds for block in per_block)
    items = pooled.iterations * batch_size
    pooled.items_per_sec = items / pooled.seconds if pooled.seconds > 0 else float("inf")
    pooled.block_items_per_sec = [block.items_per_sec for block in per_block]
    return pooled


def _check(runners: Mapping[str, Runner], **settings: float) -> None:
    if not runners:
        raise RuntimeInputError("compare_side_by_side needs at least one runner")
    for name, runner in runners.items():
        if not callable(runner):
            raise RuntimeInputError(f"runner {name!r} must be a zero-argument callable, "
                                    f"got {type(runner).__name__}")
    for key in ("batch_size", "rounds"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise RuntimeInputError(f"{key} must be a positive integer, got {settings[key]!r}")
    if settings["seconds_per_block"] <= 0 or settings["warmup"] < 0:
        raise RuntimeInputError(f"seconds_per_block must be > 0 and warmup >= 0, got "
                                f"{settings['seconds_per_block']} and {settings['warmup']}")
