"""What prune-and-bench tells a person while it runs: a line per stage, then a bar in a terminal or a
plain line per finished step in a log (step, its time, elapsed, ETA), and always one closing line.

The ETA multiplies each kind of step still to come (a digits-vit row, a speed graph, a timing group)
by the mean time of that kind so far, or a guess until one of that kind has finished.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from typing import TextIO

from tqdm.auto import tqdm


def clock(seconds: float) -> str:
    """'1:05' or '1:02:03'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunProgress:
    """Counts the steps of one run by kind; `quiet` keeps only the closing line."""

    def __init__(self, steps: Counter, quiet: bool = False, stream: TextIO | None = None,
                 guesses: dict[str, float] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.terminal = self.stream.isatty() and not quiet
        self.remaining = Counter(steps)
        self.spent: dict[str, list[float]] = defaultdict(list)
        self.guesses = guesses or {}  # seconds a step of a kind takes until one has been timed
        self.started = time.perf_counter()
        self._step_started = self.started
        total = sum(steps.values())
        self.bar = tqdm(total=total, unit="step", file=self.stream, disable=not self.terminal,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    @property
    def bars(self) -> bool:
        """Whether inner loops may draw bars of their own (a terminal, not quiet)."""
        return self.terminal

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self) -> float:
        every = [s for times in self.spent.values() for s in times]
        fallback = sum(every) / len(every) if every else 0.0
        return sum(count * (sum(self.spent[kind]) / len(self.spent[kind]) if self.spent[kind]
                            else self.guesses.get(kind, fallback))
                   for kind, count in self.remaining.items())

    def log(self, text: str) -> None:
        """A detail line (printed above the bar in a terminal); nothing when quiet."""
        if self.quiet:
            return
        if self.terminal:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def expect(self, kind: str, count: int) -> None:
        """`count` steps of `kind` are still to come (once the run knows better than at the start)."""
        self.bar.total += count - self.remaining[kind]
        self.remaining[kind] = count

    def begin(self) -> None:
        """The next step starts now (its time is measured from here)."""
        self._step_started = time.perf_counter()

    def done(self, kind: str, label: str) -> None:
        """One step of `kind` finished: the bar moves, or a log gets a line."""
        seconds = time.perf_counter() - self._step_started
        self.spent[kind].append(seconds)
        self.remaining[kind] = max(0, self.remaining[kind] - 1)
        self._step_started = time.perf_counter()
        if self.terminal:
            self.bar.set_postfix_str(f"{label} ({seconds:.0f} s)", refresh=False)
            self.bar.update()
            return
        left = sum(self.remaining.values())
        eta = f"ETA {clock(self.eta())}" if left else "last step"
        self.log(f"  done {label} in {seconds:.0f} s · elapsed {clock(self.elapsed())} · {eta}")

    def close(self, text: str) -> None:
        """The closing line, on stdout even when quiet."""
        self.bar.close()
        print(text, flush=True)
