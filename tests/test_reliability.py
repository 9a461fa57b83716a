"""Overload, deadlines and graceful shutdown against real servers."""

from __future__ import annotations

import statistics
import threading
import time

import grpc
import numpy as np
import pytest
from helpers import ServerProcess, encode, make_settings

from embedwarden.client import Client, ResourceExhausted
from embedwarden.server._metrics import METRICS
from embedwarden.server.testing import ServerThread

MODEL = "efficientnet_lite0"


def _distinct_jpegs(count: int, seed: int, size: int = 160) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), quality=90)
        for _ in range(count)
    ]


@pytest.mark.slow
def test_overload_sheds_excess_quickly_and_recovers(tmp_path):
    server = ServerProcess(
        tmp_path / "data", "--max-queue-items", "8", "--max-batch-size", "4", "--cache", "false"
    ).start()
    try:
        images = _distinct_jpegs(16, seed=1)
        with Client(server.address) as c:
            c.extract(images[:2], MODEL)  # warm
        baseline_rss = server.peak_rss_bytes()
        outcomes: list[tuple[str, float]] = []
        lock = threading.Lock()
        stop = time.monotonic() + 6.0

        def hammer(k: int) -> None:
            with Client(server.address, retries=0, timeout=60) as c:
                i = k
                while time.monotonic() < stop:
                    batch = [images[i % 16], images[(i + 1) % 16]]
                    t0 = time.perf_counter()
                    try:
                        c.extract(batch, MODEL, cache="off")
                        outcome = "ok"
                    except ResourceExhausted:
                        outcome = "exhausted"
                    except Exception as exc:  # anything else is a failure of the test
                        outcome = f"error:{exc}"
                    with lock:
                        outcomes.append((outcome, time.perf_counter() - t0))
                    i += 2

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kinds = {o for o, _ in outcomes}
        assert kinds <= {"ok", "exhausted"}, kinds
        ok = [s for o, s in outcomes if o == "ok"]
        shed = [s for o, s in outcomes if o == "exhausted"]
        assert ok and shed, (len(ok), len(shed))
        assert statistics.median(shed) < statistics.median(ok)  # refused before the work
        growth = server.peak_rss_bytes() - baseline_rss
        print(
            f"\noverload: {len(ok)} admitted (median {statistics.median(ok) * 1e3:.0f} ms), "
            f"{len(shed)} refused (median {statistics.median(shed) * 1e3:.1f} ms), peak RSS "
            f"{server.peak_rss_bytes() / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB)"
        )
        assert growth < 1024**3, f"peak RSS grew by {growth / 2**20:.0f} MiB under overload"
        with Client(server.address, retries=0) as c:  # recovers at once
            assert c.extract(images[:1], MODEL).array.shape == (1, 1280)
    finally:
        server.kill()


def test_an_expired_deadline_cancels_queued_work(tmp_path, photos):
    with ServerThread(
        make_settings(tmp_path, max_batch_size=1, max_queue_items=128, cache_enabled=False)
    ) as thread:
        labels = {"model": MODEL, "version": "1"}
        images = _distinct_jpegs(64, seed=2)
        with Client(thread.address, retries=0) as c:
            c.extract(images[:1], MODEL, cache="off")
            before = METRICS.sample("embedwarden_batch_size_sum", labels) or 0.0
            started = time.perf_counter()
            with pytest.raises(Exception) as info:
                c.extract(images, MODEL, cache="off", timeout=0.3)
            assert "DEADLINE_EXCEEDED" in str(info.value)
            assert time.perf_counter() - started < 5
            time.sleep(2.0)  # anything still running would finish meanwhile
            ran = (METRICS.sample("embedwarden_batch_size_sum", labels) or 0.0) - before
            assert ran < 32, f"{ran} of 64 inputs ran after their deadline expired"
            assert c.extract([photos["coffee"]], MODEL).array.shape == (1, 1280)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_zero(tmp_path):
    server = ServerProcess(tmp_path / "data", "--grace-s", "30", "--cache", "false").start()
    images = _distinct_jpegs(8, seed=3)
    results: list[str] = []
    started = threading.Event()

    def client_loop() -> None:
        with Client(server.address, retries=0, timeout=60) as c:
            for i in range(50):
                try:
                    c.extract(images[i % 8 : i % 8 + 4], MODEL, cache="off")
                    results.append("ok")
                except Exception as exc:
                    code = getattr(exc, "code", None)
                    results.append(code.name if isinstance(code, grpc.StatusCode) else repr(exc))
                    return
                started.set()

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(60)
    code = server.terminate(timeout=60)
    for t in threads:
        t.join(60)
    assert code == 0, server.log.read_text()[-2000:]
    assert "ok" in results
    # After SIGTERM new calls are refused (UNAVAILABLE); nothing in flight failed otherwise.
    assert set(results) <= {"ok", "UNAVAILABLE", "CANCELLED"}, results
