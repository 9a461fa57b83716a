"""The dynamic batcher: coalescing, union of layers, bounded queue, cancellation, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from embedwarden.server import InvalidInput, Overloaded, Unavailable
from embedwarden.server._settings import Settings
from embedwarden.server.serving._batching import DynamicBatcher
from embedwarden.server.serving._extraction import ExtractionService


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[int, tuple[str, ...]]] = []
        self.wide: list[bool] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(
        self, batch: np.ndarray, layers: Sequence[str], wide: bool = False
    ) -> dict[str, np.ndarray]:
        self.gate.wait()
        time.sleep(self.delay)
        self.batches.append((len(batch), tuple(layers)))
        self.wide.append(wide)
        return {layer: batch * (i + 1) for i, layer in enumerate(layers)}


def test_concurrent_items_are_coalesced_up_to_the_max_batch():
    run = Recorder()
    run.gate.clear()  # hold the worker so that items pile up
    batcher = DynamicBatcher(
        "m", run, max_batch_size=4, max_queue_delay_s=0.05, max_queue_items=100
    )
    futures = [batcher.submit(np.full((2,), i, np.float32), ["a"]) for i in range(10)]
    run.gate.set()
    results = [f.result(5) for f in futures]
    batcher.close()
    sizes = [n for n, _ in run.batches]
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) <= 4
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["a"], np.full((2,), i, np.float32))
        assert r.batch_size <= 4 and r.queue_seconds >= 0


def test_a_batch_runs_the_union_of_layers_and_each_item_keeps_its_own():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher(
        "m", run, max_batch_size=8, max_queue_delay_s=0.05, max_queue_items=100
    )
    first = batcher.submit(np.ones(1, np.float32), ["b"])
    second = batcher.submit(np.ones(1, np.float32), ["a", "b"])
    run.gate.set()
    assert set(first.result(5).outputs) == {"b"}
    assert set(second.result(5).outputs) == {"a", "b"}
    batcher.close()
    assert run.batches == [(2, ("a", "b"))]


def test_a_full_queue_refuses_at_once():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher("m", run, max_batch_size=1, max_queue_delay_s=0, max_queue_items=3)
    held = [batcher.submit(np.zeros(1, np.float32), ["a"])]
    _wait_until(lambda: batcher.depth == 0)  # the worker holds it, blocked on the gate
    held += [batcher.submit(np.zeros(1, np.float32), ["a"]) for _ in range(3)]
    started = time.perf_counter()
    with pytest.raises(Overloaded, match="limit 3"):
        batcher.submit(np.zeros(1, np.float32), ["a"])
    with batcher.reserve(2), pytest.raises(Overloaded, match="slots"), batcher.reserve(2):
        pass  # the second reservation doesn't fit beside the first: 2 + 2 > 3
    with batcher.reserve(3):  # released again: the whole budget fits
        pass
    assert time.perf_counter() - started < 0.1
    run.gate.set()
    for f in held:
        f.result(5)
    batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)  # recovers at once
    batcher.close()


def test_cancelled_items_never_run():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher("m", run, max_batch_size=1, max_queue_delay_s=0, max_queue_items=10)
    running = batcher.submit(np.zeros(1, np.float32), ["a"])
    _wait_until(lambda: batcher.depth == 0)
    doomed = batcher.submit(np.zeros(1, np.float32), ["a"])
    assert doomed.cancel()
    run.gate.set()
    running.result(5)
    batcher.close()
    assert len(run.batches) == 1


def test_errors_reach_every_item_of_the_batch_and_the_worker_survives():
    calls = []

    def failing(batch: np.ndarray, layers: Sequence[str], wide: bool) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {layer: batch for layer in layers}

    batcher = DynamicBatcher(
        "m", failing, max_batch_size=4, max_queue_delay_s=0.02, max_queue_items=10
    )
    futures = [batcher.submit(np.zeros(1, np.float32), ["a"]) for _ in range(2)]
    for f in futures:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(5)
    assert batcher.submit(np.zeros(1, np.float32), ["a"]).result(5).outputs["a"].shape == (1,)
    batcher.close()


def test_close_finishes_queued_items_then_refuses():
    run = Recorder(delay=0.01)
    batcher = DynamicBatcher("m", run, max_batch_size=2, max_queue_delay_s=0, max_queue_items=10)
    futures = [batcher.submit(np.zeros(1, np.float32), ["a"]) for _ in range(5)]
    batcher.close()
    assert all(f.done() and not f.cancelled() for f in futures)
    with pytest.raises(Unavailable):
        batcher.submit(np.zeros(1, np.float32), ["a"])


def test_a_lone_item_runs_at_once_instead_of_paying_the_delay():
    run = Recorder()
    batcher = DynamicBatcher("m", run, max_batch_size=8, max_queue_delay_s=5.0, max_queue_items=10)
    started = time.perf_counter()
    batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)
    waited = time.perf_counter() - started
    batcher.close()
    assert waited < 2.5, f"a lone item waited {waited:.2f}s for company that was not coming"


def test_a_batch_waits_for_admitted_inputs_still_decoding():
    run = Recorder()
    batcher = DynamicBatcher("m", run, max_batch_size=8, max_queue_delay_s=5.0, max_queue_items=10)
    with batcher.reserve(3):  # three inputs admitted; they "decode" one after another
        futures = []
        for i in range(3):
            futures.append(batcher.submit(np.full(1, i, np.float32), ["a"]))
            time.sleep(0.05)
        for f in futures:
            f.result(5)
    batcher.close()
    assert [n for n, _ in run.batches] == [3]


def test_lanes_run_batches_side_by_side():
    inside = []
    both = threading.Event()
    lock = threading.Lock()

    def slow(batch: np.ndarray, layers: Sequence[str], wide: bool) -> dict[str, np.ndarray]:
        with lock:
            inside.append(1)
            if len(inside) == 2:
                both.set()
        both.wait(2)  # only returns early if a second lane is inside at the same time
        return {layer: batch for layer in layers}

    batcher = DynamicBatcher(
        "m", slow, max_batch_size=1, max_queue_delay_s=0, max_queue_items=10, workers=2
    )
    futures = [batcher.submit(np.zeros(1, np.float32), ["a"]) for _ in range(2)]
    for f in futures:
        f.result(5)
    batcher.close()
    assert both.is_set(), "the two batches did not run at the same time"


def test_background_items_yield_to_foreground_ones_and_use_one_lane_at_a_time():
    """Verification work queues as background: never two background batches at once (a lane
    stays free for Extract), at most `background_batch_size` items each, and a foreground item
    submitted behind 20 background ones runs before most of them."""
    running = 0
    most = 0
    order: list[str] = []
    lock = threading.Lock()

    def run(batch: np.ndarray, layers: Sequence[str], wide: bool) -> dict[str, np.ndarray]:
        nonlocal running, most
        is_background = bool(batch[0, 0] >= 0)
        with lock:
            running += is_background
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= is_background
            order.extend("fg" if v[0] < 0 else "bg" for v in batch)
        return {layer: batch for layer in layers}

    batcher = DynamicBatcher(
        "m",
        run,
        max_batch_size=4,
        max_queue_delay_s=0.0,
        max_queue_items=100,
        workers=2,
        background_batch_size=2,
    )
    with batcher.reserve(20, background=True):
        background = [
            batcher.submit(np.full((1,), i, np.float32), ["a"], background=True) for i in range(20)
        ]
        time.sleep(0.03)
        foreground = batcher.submit(np.full((1,), -1, np.float32), ["a"])
        foreground.result(5)
        done_before = sum(f.done() for f in background)
        for f in background:
            f.result(5)
    batcher.close()
    assert most == 1, "two background batches ran side by side"
    assert done_before <= 6, f"{done_before} background items ran before the foreground one"
    assert order.count("bg") == 20 and order.count("fg") == 1


def test_the_depth_callback_keeps_background_work_apart():
    # The HPA scales on the foreground depth: background items (Verify's diagnosis) must not
    # count there, since more replicas would not run them any sooner.
    run = Recorder()
    run.gate.clear()
    seen: list[tuple[int, int]] = []
    batcher = DynamicBatcher(
        "m",
        run,
        max_batch_size=1,
        max_queue_delay_s=0,
        max_queue_items=10,
        on_depth=lambda waiting, background: seen.append((waiting, background)),
    )
    held = batcher.submit(np.zeros(1, np.float32), ["a"])
    _wait_until(lambda: batcher.depth == 0)  # the only lane holds it, blocked on the gate
    later = [batcher.submit(np.zeros(1, np.float32), ["a"], background=True) for _ in range(3)]
    later.append(batcher.submit(np.zeros(1, np.float32), ["a"]))
    assert seen[-4:] == [(0, 1), (0, 2), (0, 3), (1, 3)]
    run.gate.set()
    for future in [held, *later]:
        future.result(5)
    batcher.close()
    assert seen[-1] == (0, 0)


def test_a_lone_batch_runs_wide_and_the_other_lanes_wait_for_it():
    """With `widen`, a batch that is all the work there is runs wide; while it runs no other
    lane starts, and what queued meanwhile runs narrow, side by side."""
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher(
        "m", run, max_batch_size=1, max_queue_delay_s=0, max_queue_items=10, workers=2, widen=True
    )
    lone = batcher.submit(np.zeros(1, np.float32), ["a"])
    _wait_until(lambda: batcher.depth == 0)  # taken, held on the gate
    queued = [batcher.submit(np.ones(1, np.float32), ["a"]) for _ in range(2)]
    time.sleep(0.05)
    assert batcher.depth == 2, "a lane took work while the wide batch ran"
    run.gate.set()
    for f in [lone, *queued]:
        f.result(5)
    batcher.close()
    assert run.wide[0] is True
    assert run.wide[1:].count(True) <= 1  # the last of the queue may find the server idle


def test_without_widen_or_with_one_lane_no_batch_runs_wide():
    for workers, widen in ((2, False), (1, True)):
        run = Recorder()
        batcher = DynamicBatcher(
            "m",
            run,
            max_batch_size=1,
            max_queue_delay_s=0,
            max_queue_items=10,
            workers=workers,
            widen=widen,
        )
        batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)
        batcher.close()
        assert run.wide == [False]


def test_a_batch_stays_narrow_while_admitted_inputs_are_still_on_their_way():
    run = Recorder()
    batcher = DynamicBatcher(
        "m", run, max_batch_size=4, max_queue_delay_s=0, max_queue_items=10, workers=2, widen=True
    )
    with batcher.reserve(2):  # two admitted, one submitted: the other is still decoding
        batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)
    with batcher.reserve(1):
        batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)
    batcher.close()
    assert run.wide == [False, True]


def test_a_batch_stays_narrow_while_background_inputs_are_decoding():
    """Between two chunks of a Verify its next inputs are decoding, queued nowhere yet: a
    foreground batch then is not alone (a two-thread pass beside the decoding waits on its
    preempted thread)."""
    run = Recorder()
    batcher = DynamicBatcher(
        "m", run, max_batch_size=4, max_queue_delay_s=0, max_queue_items=10, workers=2, widen=True
    )
    with batcher.reserve(1), batcher.reserve(4, background=True):
        batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)
    with batcher.reserve(1):
        batcher.submit(np.zeros(1, np.float32), ["a"]).result(5)
    batcher.close()
    assert run.wide == [False, True]


def test_cpu_batches_default_to_two_with_single_threaded_lanes() -> None:
    """A single-threaded pass of EfficientNet-Lite0 cost more per image at batch 4 than at 2
    (its activations outgrow the core's caches), so such lanes take batches of 2; an explicit
    size and the GPU keep theirs."""
    from embedwarden.server import Settings
    from embedwarden.server._frameworks import plan_threads

    narrow = plan_threads(Settings(inference_lanes=2, torch_threads=1), "cpu")
    assert narrow.max_batch_size == 2
    assert plan_threads(Settings(inference_lanes=1, torch_threads=2), "cpu").max_batch_size == 4
    assert plan_threads(Settings(torch_threads=1, max_batch_size=8), "cpu").max_batch_size == 8
    assert plan_threads(Settings(), "cuda").max_batch_size == 32


class Decoder:
    """A preprocessor stand-in: records each input it decodes; b"bad" is refused."""

    def __init__(self) -> None:
        self.decoded: list[bytes] = []

    def prepare(self, source: bytes, max_pixels: int) -> np.ndarray:
        if source == b"bad":
            raise InvalidInput("not an image")
        self.decoded.append(source)
        return np.ones((2,), np.float32)


def _computing(pool: ThreadPoolExecutor, run: Recorder) -> tuple[ExtractionService, object]:
    batcher = DynamicBatcher("m", run, max_batch_size=4, max_queue_delay_s=0, max_queue_items=8)
    model = SimpleNamespace(preprocessor=Decoder(), batcher=batcher)
    # One item's path needs only the settings, the pool and the model's decoder and batcher.
    return ExtractionService(None, Settings(), pool, None, None), model  # type: ignore[arg-type]


def test_a_decoded_input_goes_to_the_batcher_without_waiting_for_the_event_loop():
    """The pool thread that decodes an input queues it for inference itself: a loop busy with
    other work meanwhile holds back neither the batch nor its two-thread pass (the loop woke
    just as the pass started, when it did the queueing)."""
    run = Recorder()
    ran_at: list[float] = []

    def timed(batch: np.ndarray, layers: Sequence[str], wide: bool = False):
        ran_at.append(time.monotonic())
        return run(batch, layers, wide)

    with ThreadPoolExecutor(1) as pool:
        service, model = _computing(pool, timed)  # type: ignore[arg-type]

        async def main() -> float:
            task = asyncio.ensure_future(service._compute(model, 0, b"x", ["a"], False))  # type: ignore[arg-type]
            await asyncio.sleep(0)  # the task hands its input to the pool
            time.sleep(0.5)  # the loop busy elsewhere
            resumed = time.monotonic()
            output, _ = await task
            np.testing.assert_array_equal(output.outputs["a"], np.ones((2,), np.float32))
            return resumed

        resumed = asyncio.run(main())
        model.batcher.close()  # type: ignore[attr-defined]
    assert len(ran_at) == 1 and ran_at[0] < resumed


def test_one_items_decode_error_and_cancellation_reach_its_request():
    run = Recorder()
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        service, model = _computing(pool, run)  # type: ignore[arg-type]

        async def main() -> None:
            with pytest.raises(InvalidInput, match=r"inputs\[3\]: not an image"):
                await service._compute(model, 3, b"bad", ["a"], False)  # type: ignore[arg-type]
            pool.submit(gate.wait)  # the pool busy: the next input waits for a thread
            task = asyncio.ensure_future(service._compute(model, 0, b"late", ["a"], False))  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()

        asyncio.run(main())
    model.batcher.close()  # type: ignore[attr-defined]
    assert model.preprocessor.decoded == [] and run.batches == []  # type: ignore[attr-defined]
