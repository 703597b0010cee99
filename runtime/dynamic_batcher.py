"""Dynamic batching for one model: gather requests into engine calls, pad to a compiled size, split back.

Requests wait at most `max_delay` seconds for others to join them (and not at all once the engine
has been busy that long); a batch holds up to the largest compiled batch size and is padded with
zeros to the smallest compiled size that fits. The queue is bounded in items: a request that would
overflow it is refused at once (`QueueFullError`, a 503 for the server) rather than left to wait.
The engine runs in worker threads (one per stream), so the event loop keeps answering while it
computes; with `streams` > 1 that many batches run at once (the engines' multi-stream schedulers
share the cores out), and the next batch forms while the others compute.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .engine_base import Engine


class QueueFullError(RuntimeError):
    """The model's queue holds `max_queue` items already."""


class BatcherClosedError(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class _Request:
    items: np.ndarray  # (n, ...) the request's own batch
    future: asyncio.Future = field(repr=False)
    arrived: float


class DynamicBatcher:
    """Serve `submit(items)` calls through engines compiled at each of `engines`' batch sizes."""

    def __init__(self, engines: Mapping[int, Engine], *, max_delay: float, max_queue: int, streams: int = 1,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if not engines:
            raise ValueError("a batcher needs at least one engine")
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.engines = dict(sorted(engines.items()))
        self.max_batch = max(self.engines)
        self.max_delay, self.max_queue = max_delay, max_queue
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._waiting: deque[_Request] = deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.streams = streams
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="vitsparse-engine")
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Items waiting for the engine (not counting the batch it is running)."""
        return self._queued_items

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.streams)
        self._worker = asyncio.get_running_loop().create_task(self._run_forever())

    async def submit(self, items: np.ndarray) -> list[np.ndarray]:
        """Every output of the model for `items` (n, ...), n ≤ the largest compiled batch size."""
        if self._closing or self._worker is None:
            raise BatcherClosedError("the server is shutting down")
        count = len(items)
        if not 1 <= count <= self.max_batch:
            raise ValueError(f"a request may hold 1 to {self.max_batch} items (the largest compiled batch "
                             f"size), got {count}")
        if self._queued_items + count > self.max_queue:
            raise QueueFullError(f"the queue holds {self._queued_items} of {self.max_queue} items")
        loop = asyncio.get_running_loop()
        request = _Request(items, loop.create_future(), loop.time())
        self._waiting.append(request)
        self._queued_items += count
        self._wakeup.set()
        return await request.future

    async def close(self) -> None:
        """Stop taking work, finish every request already queued, then stop the worker."""
        self._closing = True
        if self._worker is not None:
            self._wakeup.set()
            await self._worker
        self._executor.shutdown(wait=True)

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                if self._closing:
                    await asyncio.gather(*self._running)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()  # a stream is free: form the next batch for it
            await self._gather(loop)
            task = loop.create_task(self._run_batch(loop, self._take_batch()))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the batch is full, the oldest request has waited max_delay, or shutdown begins."""
        deadline = self._waiting[0].arrived + self.max_delay
        while self._queued_items < self.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Request]:
        """Requests from the front whose items fit the largest compiled size together (at least one)."""
        batch, count = [], 0
        while self._waiting and count + len(self._waiting[0].items) <= self.max_batch:
            request = self._waiting.popleft()
            batch.append(request)
            count += len(request.items)
        self._queued_items -= count
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        items = np.concatenate([request.items for request in batch])
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, self._compute, items)
        except Exception as exc:  # an engine failure fails this batch's requests, not the server
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        self._on_batch(len(items), seconds)
        start = 0
        for request in batch:
            stop = start + len(request.items)
            if not request.future.done():  # its client may have gone away
                request.future.set_result([output[start:stop] for output in outputs])
            start = stop

    def _compute(self, items: np.ndarray) -> tuple[list[np.ndarray], float]:
        """Pad to the smallest compiled size that fits, run, and cut the padding off again."""
        count = len(items)
        size = next(size for size in self.engines if size >= count)
        if size > count:
            padding = np.zeros((size - count, *items.shape[1:]), dtype=items.dtype)
            items = np.concatenate([items, padding])
        started = time.perf_counter()
        outputs = self.engines[size].run([items])
        return [np.asarray(output)[:count] for output in outputs], time.perf_counter() - started
