"""Timed loops: call a function repeatedly for a time budget or a call count, recording each call.

Everything uses time.perf_counter. A budget always allows at least one call, so a tiny budget
still yields a latency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Call = tuple[float, float]  # (start, end) of one call, perf_counter seconds


@dataclass(frozen=True)
class Budget:
    """Stop after `seconds` or after `calls` calls, whichever comes first (None: no limit on that)."""

    seconds: float | None = None
    calls: int | None = None

    def __post_init__(self) -> None:
        if self.seconds is None and self.calls is None:
            raise ValueError("a budget needs seconds or calls")


def timed_calls(fn: Callable[[], object], budget: Budget) -> list[Call]:
    """Call fn in sequence until the budget is spent; the (start, end) of every call."""
    calls: list[Call] = []
    deadline = None if budget.seconds is None else time.perf_counter() + budget.seconds
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        calls.append((start, end))
        out_of_calls = budget.calls is not None and len(calls) >= budget.calls
        if out_of_calls or (deadline is not None and end >= deadline):
            return calls


def concurrent_calls(fn: Callable[[], object], budget: Budget, num_threads: int) -> list[Call]:
    """num_threads threads each call fn in a loop until the shared budget is spent; all calls, by start."""
    lock = threading.Lock()
    issued = 0
    calls: list[Call] = []
    errors: list[BaseException] = []
    deadline = None if budget.seconds is None else time.perf_counter() + budget.seconds

    def take() -> bool:
        nonlocal issued
        with lock:
            if errors or (budget.calls is not None and issued >= budget.calls):
                return False
            if deadline is not None and issued >= num_threads and time.perf_counter() >= deadline:
                return False
            issued += 1
            return True

    def worker() -> None:
        try:
            while take():
                start = time.perf_counter()
                fn()
                end = time.perf_counter()
                with lock:
                    calls.append((start, end))
        except BaseException as exc:  # re-raised in the caller's thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sorted(calls)
