"""Dynamic batching: coalesce concurrent inputs of one model into batches, run by one or more
worker threads ("inference lanes").

A batch waits for more items only while admitted inputs are still being decoded (they are known
to be on their way), at most `max_queue_delay_s` after the oldest item arrived, and never beyond
`max_batch_size` items: a lone request runs at once instead of paying the delay. Items may ask
for different layers: the batch runs once with the union and each item keeps its own. The queue
is bounded: admission (`reserve`) refuses inputs at once with `Overloaded` (RESOURCE_EXHAUSTED)
instead of growing memory. A cancelled item (deadline, client gone) that has not started is
dropped without running.

Background items (verification and its diagnosis, which may be hundreds of inputs) queue apart:
a lane takes them only when no foreground item waits, at most `background_batch_size` at a time
and on one lane at a time, so a foreground request always finds a lane free of them within one
small batch and its latency stays near idle.

Wide passes (`widen`): a foreground batch that finds the other lanes idle, nothing else queued
and no admitted input still decoding runs "wide", on all the lanes' cores in one pass, and the
other lanes wait until it ends. A lone client then gets every core (a pass of one image ran
1.3-1.5x faster on 2 cores, AMD EPYC, once every such pass ran on one team thread), and under
load the lanes stay single-threaded side by side. The run_batch callable decides what wide
means (`serving._widening` keeps the bytes identical).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .._errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray, Sequence[str], bool], dict[str, np.ndarray]]  # (.., wide)


@dataclass(frozen=True)
class ItemOutput:
    outputs: dict[str, np.ndarray]  # layer -> this item's output (a view into the batch output)
    queue_seconds: float
    inference_seconds: float
    batch_size: int


@dataclass
class _Item:
    tensor: np.ndarray
    layers: tuple[str, ...]
    future: Future[ItemOutput]
    enqueued: float
    background: bool = False


class DynamicBatcher:
    """The queue of one model, drained by `workers` threads (inference lanes); `submit` is
    thread-safe and never blocks."""

    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_items: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int, int], None] | None = None,
        workers: int = 1,
        background_batch_size: int = 2,
        widen: bool = False,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue_items = max(1, max_queue_items)
        self._on_batch = on_batch
        self._on_depth = on_depth
        self.background_batch_size = max(1, background_batch_size)
        self._queue: deque[_Item] = deque()
        self._background: deque[_Item] = deque()
        self._background_lanes = 0  # lanes running a background batch now (0 or 1)
        self._cond = threading.Condition()
        self._closed = False
        self._reserved = 0  # admitted inputs: decoding, queued or running
        self._reserved_background = 0
        self._running = 0  # inputs in batches being run
        self._widen = widen and workers > 1
        self._wide = False  # a wide batch is running: the other lanes wait
        # Several workers ("inference lanes") run batches side by side: on few CPU cores one
        # single-threaded forward pass per core beats one multi-threaded pass (see _frameworks).
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._background)

    def submit(
        self, tensor: np.ndarray, layers: Sequence[str], background: bool = False
    ) -> Future[ItemOutput]:
        future: Future[ItemOutput] = Future()
        with self._cond:
            if self._closed:
                raise Unavailable(f"model {self.name} is unloading; retry on another version")
            queue = self._background if background else self._queue
            if len(queue) >= self.max_queue_items:
                raise Overloaded(
                    f"model {self.name}: {len(queue)} inputs are already queued (limit "
                    f"{self.max_queue_items}); retry with backoff"
                )
            queue.append(_Item(tensor, tuple(layers), future, time.perf_counter(), background))
            depth = len(self._queue), len(self._background)
            self._cond.notify_all() if background else self._cond.notify()
        if self._on_depth:
            self._on_depth(*depth)
        return future

    @contextmanager
    def reserve(self, count: int, background: bool = False) -> Iterator[None]:
        """Admission: holds `count` of the `max_queue_items` slots while those inputs are
        decoded, queued and run. Refused at once, before any decoding, when they don't fit, so
        memory stays bounded however many clients call. Background inputs have slots of their
        own: they never make a foreground batch wait for them."""
        with self._cond:
            held = self._reserved_background if background else self._reserved
            if held + count > self.max_queue_items:
                kind = "background " if background else ""
                raise Overloaded(
                    f"model {self.name}: {held} of {self.max_queue_items} {kind}input slots are "
                    f"in use, {count} more don't fit; retry with backoff"
                )
            if background:
                self._reserved_background += count
            else:
                self._reserved += count
        try:
            yield
        finally:
            with self._cond:
                if background:
                    self._reserved_background -= count
                else:
                    self._reserved -= count
                self._cond.notify_all()  # fewer inputs on their way: a waiting batch may go

    def close(self, timeout: float | None = None) -> None:
        """Stops accepting; items already queued still run. Waits for the worker to finish."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _background_ready(self) -> bool:
        return bool(self._background) and self._background_lanes == 0

    def _take_batch(self) -> tuple[list[_Item], bool] | None:
        """The next batch, and whether it runs wide; None once closed and drained."""
        with self._cond:
            while self._wide or (not self._queue and not self._background_ready()):
                if self._closed and not self._queue and not self._background and not self._wide:
                    return None  # closed and drained
                self._cond.wait()
            wide = False
            if self._queue:
                batch = self._take_foreground()
                wide = self._widen and self._alone(len(batch))
                self._wide = wide
            else:
                count = min(self.background_batch_size, len(self._background))
                batch = [self._background.popleft() for _ in range(count)]
                self._background_lanes += 1
            depth = len(self._queue), len(self._background)
        if self._on_depth:
            self._on_depth(*depth)
        return batch, wide

    def _alone(self, count: int) -> bool:
        """Whether a batch of `count` just taken is all the work there is (lock held): no other
        batch running, nothing queued, no admitted input still decoding, background ones
        included. (Between two chunks of a Verify its next inputs are decoding: a two-thread
        pass beside them waits on whichever of its threads is preempted, and Extract p99 during
        a 256-item Verify read 2.4-4.0x idle against 1.8x narrow, Intel Xeon.)"""
        return (
            not self._queue
            and not self._background
            and self._background_lanes == 0
            and self._reserved_background == 0
            and self._running == count
            and self._reserved <= count
        )

    def _take_foreground(self) -> list[_Item]:
        """The next foreground batch (called holding the lock, with the queue not empty)."""
        deadline = self._queue[0].enqueued + self.max_queue_delay_s
        while len(self._queue) < self.max_batch_size and not self._closed:
            on_the_way = self._reserved - len(self._queue) - self._running
            remaining = deadline - time.perf_counter()
            if on_the_way <= 0 or remaining <= 0:
                break
            self._cond.wait(remaining)
        count = min(self.max_batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(count)]
        self._running += count
        return batch

    def _loop(self) -> None:
        while (taken := self._take_batch()) is not None:
            batch, wide = taken
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._run(live, wide)
            with self._cond:
                if batch and batch[0].background:  # empty: another lane took the queue
                    self._background_lanes -= 1
                    self._cond.notify_all()  # the next background batch may go
                else:
                    self._running -= len(batch)
                if wide:
                    self._wide = False
                    self._cond.notify_all()  # the other lanes may take work again

    def _run(self, items: list[_Item], wide: bool) -> None:
        started = time.perf_counter()
        try:
            layers = sorted({layer for item in items for layer in item.layers})
            stacked = np.stack([item.tensor for item in items])
            outputs = self._run_batch(stacked, layers, wide)
        except BaseException as exc:
            for item in items:
                item.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        if self._on_batch:
            self._on_batch(len(items), seconds)
        for i, item in enumerate(items):
            item.future.set_result(
                ItemOutput(
                    outputs={layer: outputs[layer][i] for layer in item.layers},
                    queue_seconds=started - item.enqueued,
                    inference_seconds=seconds,
                    batch_size=len(items),
                )
            )
