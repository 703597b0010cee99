"""Epoch checkpoints of the training loop, so a stopped run resumes from its last finished epoch.

Training steps call `finetune` from deep inside the pruners (score training, the head-channel search,
threshold learning, gradual masks), so the store is found through a context variable instead of being
threaded through every signature: `vitsparse prune` opens `resumable(store)` around a stage, and each
`finetune` call inside it, numbered in the order it runs, saves its state after every epoch and, on a
resumed run, starts from the state saved under its number. Each epoch reseeds the RNGs and the data
order from the seed and the epoch alone, so a resumed run trains on what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitsparse.runtime.atomic import atomic_path

EpochReport = Callable[[dict[str, Any]], None]


@dataclass
class EpochStore:
    """Where one stage's training calls keep their state: `directory/call-<n>.pt`, written by rank 0.

    `on_epoch(report)` hears of every finished epoch (call, epoch, epochs, loss, train top-1, seconds).
    """

    directory: Path
    writer: bool = True
    on_epoch: EpochReport | None = None
    calls: int = field(default=0, init=False)

    def next_call(self) -> int:
        """The number of the `finetune` call now starting (0, 1, ... within the stage)."""
        self.calls += 1
        return self.calls - 1

    def path(self, call: int) -> Path:
        return self.directory / f"call-{call}.pt"

    def load(self, call: int) -> dict[str, Any] | None:
        """The state saved after the last finished epoch of `call`, or None when it never finished one."""
        path = self.path(call)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: say which, do not train from a wrong state
            raise ValueError(
                f"cannot read the epoch checkpoint {path}: {err}; delete it to redo that stage from its start"
            ) from None

    def save(self, call: int, state: dict[str, Any]) -> None:
        if not self.writer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(call)) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        """Drop every call's state (the stage finished and its own checkpoint holds the result)."""
        if self.writer and self.directory.is_dir():
            for path in self.directory.glob("call-*.pt"):
                path.unlink(missing_ok=True)


_ACTIVE: ContextVar[EpochStore | None] = ContextVar("vitsparse_epoch_store", default=None)


@contextlib.contextmanager
def resumable(store: EpochStore) -> Iterator[EpochStore]:
    """Every `finetune` call inside the block saves and resumes its epochs through `store`."""
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def active_store() -> EpochStore | None:
    """The store of the enclosing `resumable` block, if any."""
    return _ACTIVE.get()


def epoch_seed(seed: int, epoch: int, call: int = 0) -> int:
    """The seed of one epoch of one training call: a function of the run's seed, the call and the epoch."""
    return ((seed * 1_000_003 + call) * 7_919 + epoch) % (2**31 - 1)


def is_writer() -> bool:
    """Rank 0 writes checkpoints; under torchrun the others read them."""
    return int(os.environ.get("RANK", "0")) == 0
