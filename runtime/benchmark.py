"""Benchmark one engine: warm up, then time calls in the sync or async scenario.

sync: one stream, calls in sequence; latency is each call's time, throughput items over the wall
time. async: `num_streams` Python threads each call `engine.run` in a loop, so that many requests
are in flight at once; latency is each request's completion time, throughput all items over the
wall time from the first start to the last end. For DeepSparse, build the engine with the same
num_streams (`benchmark_model` does), or its single-stream scheduler runs the threads one by one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from .engine_base import Engine
from .engine_registry import create_engine
from .errors import RuntimeInputError
from .results import BenchmarkResult, latency_summary
from .timing import Budget, Call, concurrent_calls, timed_calls

DEFAULT_SECONDS = 10.0
Scenario = Callable[[Callable[[], object], Budget, int], list[Call]]

SCENARIOS: dict[str, Scenario] = {
    "sync": lambda fn, budget, streams: timed_calls(fn, budget),
    "async": concurrent_calls,
}


def benchmark(engine: Engine, inputs: Sequence[np.ndarray] | None = None, *, scenario: str = "sync",
              num_streams: int | None = None, seconds: float | None = None, iterations: int | None = None,
              warmup_seconds: float = 1.0) -> BenchmarkResult:
    """Time `engine` on `inputs` (random ones of the compiled shapes if None) for seconds or iterations.

    Stops at whichever of `seconds` / `iterations` comes first (10 s if neither is given). async
    runs num_streams threads (default: the engine's streams, at least 2).
    """
    scenario_fn, streams = _scenario(scenario, num_streams, engine.num_streams)
    budget = _budget(seconds, iterations)
    arrays = engine.random_inputs() if inputs is None else list(inputs)
    engine.run(arrays)  # checks the inputs once, in the caller's thread, with a clear error

    def call() -> object:
        return engine.run(arrays)

    scenario_fn(call, Budget(seconds=max(warmup_seconds, 0.0)), streams)  # at least one call per stream
    calls = scenario_fn(call, budget, streams)
    result = summarize(calls, name=engine.name, batch_size=engine.batch_size, scenario=scenario,
                       num_streams=streams)
    result.model = str(engine.model_path)
    result.num_cores = engine.num_cores
    result.fraction_of_supported_ops = engine.fraction_of_supported_ops
    result.precision = engine.effective_precision
    return result


def benchmark_model(model_path: str | os.PathLike, engine: str, *, batch_size: int = 1,
                    num_cores: int | None = None, scenario: str = "sync", num_streams: int | None = None,
                    seconds: float | None = None, iterations: int | None = None,
                    warmup_seconds: float = 1.0, precision: str | None = None) -> BenchmarkResult:
    """Build the engine for the scenario (async: with num_streams streams) and benchmark it."""
    _, streams = _scenario(scenario, num_streams, default_streams=num_cores or os.cpu_count() or 2)
    built = create_engine(engine, model_path, batch_size=batch_size, num_cores=num_cores,
                          num_streams=streams, precision=precision)
    return benchmark(built, scenario=scenario, num_streams=streams, seconds=seconds, iterations=iterations,
                     warmup_seconds=warmup_seconds)


def summarize(calls: Sequence[Call], *, name: str, batch_size: int, scenario: str,
              num_streams: int) -> BenchmarkResult:
    """A result from timed calls: items/sec over the wall time they span, per-call latencies."""
    wall = max(end for _, end in calls) - min(start for start, _ in calls)
    items_per_sec = len(calls) * batch_size / wall if wall > 0 else float("inf")
    return BenchmarkResult(engine=name, batch_size=batch_size, scenario=scenario, num_streams=num_streams,
                           iterations=len(calls), seconds=wall, items_per_sec=items_per_sec,
                           latency_ms=latency_summary([end - start for start, end in calls]))


def _scenario(scenario: str, num_streams: int | None, default_streams: int) -> tuple[Scenario, int]:
    if scenario not in SCENARIOS:
        raise RuntimeInputError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if num_streams is not None and (not isinstance(num_streams, int) or num_streams < 1):
        raise RuntimeInputError(f"num_streams must be a positive integer, got {num_streams!r}")
    if scenario == "sync":
        if num_streams not in (None, 1):
            raise RuntimeInputError(f"the sync scenario runs one stream; got num_streams={num_streams} "
                                    f"(use scenario='async')")
        return SCENARIOS[scenario], 1
    return SCENARIOS[scenario], num_streams or max(default_streams, 2)


def _budget(seconds: float | None, iterations: int | None) -> Budget:
    if seconds is not None and seconds <= 0:
        raise RuntimeInputError(f"seconds must be > 0, got {seconds}")
    if iterations is not None and (not isinstance(iterations, int) or iterations < 1):
        raise RuntimeInputError(f"iterations must be a positive integer, got {iterations!r}")
    if seconds is None and iterations is None:
        seconds = DEFAULT_SECONDS
    return Budget(seconds=seconds, calls=iterations)
