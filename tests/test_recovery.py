"""Recovery does not hold the server: after kill -9 with a large un-snapshotted HNSW log, the
default model is SERVING as soon as a server with no collections would be, the collection
answers UNAVAILABLE with its progress while its log is replayed, then comes back complete; the
snapshot written right after recovery means a second kill -9 replays nothing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ServerProcess

from embedwarden.client import Client, EmbedwardenError

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
VECTORS = 12_000  # bench/recovery_bench.py measures 100,000
BATCH = 500
ARGS = ("--index-snapshot-interval-s", "0")  # no periodic snapshot: the whole log stays


def wait_available(client: Client, name: str, timeout: float = 300.0) -> tuple[int, list[str]]:
    """Polls until the collection answers; returns its size and the UNAVAILABLE messages."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return client.describe_collection(name).size, seen
        except EmbedwardenError as exc:
            assert exc.code is grpc.StatusCode.UNAVAILABLE, exc
            seen.append(exc.details)
            time.sleep(0.05)
    raise AssertionError(f"{name} did not come back in {timeout}s: {seen[-3:]}")


def test_a_long_log_replay_does_not_hold_the_models(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ServerProcess(data, *ARGS).start().stop()  # records the golden embeddings once
    baseline = ServerProcess(data, *ARGS).start()  # a restart with no collections
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((VECTORS, 1280)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(VECTORS)]
    try:
        with Client(baseline.address, timeout=300) as client:
            info = client.create_collection("big", MODEL, kind="hnsw")
            started = time.perf_counter()
            for start in range(0, VECTORS, BATCH):
                chunk = slice(start, start + BATCH)
                client.upsert("big", ids[chunk], vectors[chunk], fingerprint=info.fingerprint)
            building = time.perf_counter() - started
    finally:
        baseline.kill()

    crashed = ServerProcess(data, *ARGS).start()
    serving = time.perf_counter()
    try:
        with Client(crashed.address, timeout=60, retries=0) as client:
            assert client.health(f"model:{MODEL}@1") == "SERVING"
            size, unavailable = wait_available(client, "big")
            recovery = time.perf_counter() - serving
            assert size == VECTORS
            hits = client.search("big", ids=ids[::97], k=1)
            assert [h[0].id for h in hits] == ids[::97]
            own = client.search("big", vectors[::13], k=1, fingerprint=info.fingerprint)
            assert np.mean([h[0].id == i for h, i in zip(own, ids[::13], strict=True)]) > 0.99
            # The snapshot after recovery: the whole log covered, then trimmed.
            folder = data / "index"
            deadline = time.monotonic() + 120
            while not list(folder.glob("*/snapshot-*.json")) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        crashed.kill()
    # SERVING within what the restart without collections took (plus scheduling noise).
    assert crashed.serving_after <= baseline.serving_after * 1.3 + 2.0, (
        crashed.serving_after,
        baseline.serving_after,
    )
    assert unavailable, "the collection was back before the first request: replay too short"
    progress = [m for m in unavailable if re.search(r"\d+ of \d+ entries \(\d+%\)", m)]
    assert progress and all("'big'" in m for m in unavailable), unavailable[-3:]
    assert list((data / "index").glob("*/snapshot-*.json")), "no snapshot after recovery"

    again = ServerProcess(data, *ARGS).start()  # a second crash replays nothing
    try:
        with Client(again.address, timeout=60) as client:
            assert wait_available(client, "big")[0] == VECTORS
    finally:
        again.kill()
    log = again.log.read_text()
    replays = re.findall(r"collection big recovered: .*, (\d+) log entries replayed", log)
    assert replays[-2:] == [str(VECTORS // BATCH), "0"], replays
    print(
        f"\nSERVING after {baseline.serving_after:.1f}s without collections, "
        f"{crashed.serving_after:.1f}s with {VECTORS} HNSW vectors to replay (built in "
        f"{building:.1f}s); the collection back {recovery:.1f}s after SERVING"
    )
