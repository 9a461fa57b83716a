"""The cache's guarantees with real server processes (`python -m embedwarden.server --port 0`):
kill -9 during a burst of misses, graceful shutdown, and two servers on one data directory.

What an acknowledged request guarantees about its entries (README, "Cache"): nothing is written
before the response; entries are committed shortly after. A crash may lose entries that were
not committed yet, never corrupt one: after a restart each entry is absent or holds exactly the
bytes a response returned. A graceful shutdown (SIGTERM) commits every queued entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close

from embedwarden.client import Client, EmbedwardenError
from embedwarden.server.cache._db import CacheDB, VerifyReport
from embedwarden.server.cache._format import KeyMaker, decode_entry
from embedwarden.server.cache._lmdb import verify_cache
from embedwarden.server.models._preprocess import RawImage
from embedwarden.server.serving._extraction import input_digest
from embedwarden.server.testing import ServerProcess

pytestmark = pytest.mark.slow  # three server processes; they still run in CI

MODEL = "efficientnet_lite0"
LAYERS = ["features", "logits"]  # pooling "none": 250 KB per item, heavy write bursts


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def burst(
    address: str,
    inputs: list[np.ndarray],
    acked: dict[int, dict[str, bytes]],
    stop: threading.Event,
    workers: int = 4,
) -> list[threading.Thread]:
    """Concurrent single-item requests; records the bytes of every acknowledged response."""

    def work(k: int) -> None:
        with Client(address, timeout=60, retries=0) as client:
            for i in range(k, len(inputs), workers):
                if stop.is_set():
                    return
                try:
                    r = client.extract([inputs[i]], MODEL, layers=LAYERS, pooling="none")
                except EmbedwardenError:
                    return  # the server is gone
                acked[i] = {layer: r[layer][0].tobytes() for layer in LAYERS}

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    return threads


def read_back(address: str, inputs: list[np.ndarray], acked: dict[int, dict[str, bytes]]) -> int:
    """Requests every acknowledged input again; a hit must be byte-identical to the acked
    response, a miss is recomputed (and must agree). Returns the number of hits."""
    hits = 0
    with Client(address, timeout=120) as client:
        order = sorted(acked)
        for start in range(0, len(order), 16):
            chunk = order[start : start + 16]
            r = client.extract([inputs[i] for i in chunk], MODEL, layers=LAYERS, pooling="none")
            for row, i in enumerate(chunk):
                for layer in LAYERS:
                    got = r[layer][row]
                    if r.cached[layer][row]:
                        assert got.tobytes() == acked[i][layer], f"input {i} {layer}"
                        hits += 1
                    else:
                        expected = np.frombuffer(acked[i][layer], got.dtype).reshape(got.shape)
                        # Recomputed in a batch of 16, acked alone: full maps and logits move
                        # by up to 4.2e-6 of max|ref| with batch composition (measured
                        # in-process, AVX-512 and AVX2, 1 or 2 threads); 10x margin.
                        assert_close(got, expected, rel=5e-5, what=f"input {i} {layer}")
    return hits


def stored(cache_dir: Path, fingerprint: str, inputs: list[np.ndarray]) -> list[dict[str, bytes]]:
    """Offline: the stored payload of each input's entries (b"" where absent), read-only."""
    maker = KeyMaker()
    db = CacheDB(cache_dir, 1 << 40, readonly=True)
    try:
        out = []
        for image in inputs:
            digest = input_digest(RawImage(image.tobytes(), image.shape, "uint8"))
            keys = [
                maker.many(fingerprint, layer, "none", "float32", False, [digest])[0]
                for layer in LAYERS
            ]
            values, _ = db.get_many(keys)
            out.append(
                {
                    layer: b"" if v is None else decode_entry(k, v).tobytes()
                    for layer, k, v in zip(LAYERS, keys, values, strict=True)
                }
            )
        return out
    finally:
        db.close()


@dataclass
class Crashed:
    data: Path
    report: VerifyReport
    server: ServerProcess
    inputs: list[np.ndarray]
    acked: dict[int, dict[str, bytes]]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crashed]:
    """A server killed with SIGKILL in the middle of a burst of misses, then restarted."""
    data = tmp_path_factory.mktemp("crash") / "data"
    first = ServerProcess(data, "--cache-audit-fraction", "0", name="first")
    second = ServerProcess(data, "--cache-audit-fraction", "0", name="second")
    try:
        first.start()
        inputs = images(400, seed=1)
        acked: dict[int, dict[str, bytes]] = {}
        stop = threading.Event()
        threads = burst(first.address, inputs, acked, stop)
        with Client(first.address, timeout=10) as client:
            deadline = time.monotonic() + 120
            # At most `workers` items are computed but not yet acknowledged at any moment, so
            # 2 x (2 + 4) committed entries include those of at least 2 acknowledged items.
            while len(acked) < 8 or client.cache_stats().entries < 12:
                assert time.monotonic() < deadline, "the burst made no progress"
                time.sleep(0.02)
        first.kill()  # requests in flight, writes queued, a group commit likely running
        stop.set()
        for t in threads:
            t.join(60)
        report = verify_cache(data / "cache")  # offline, before anything else opens it
        second.start()
        yield Crashed(data, report, second, inputs, dict(acked))
    finally:
        first.kill()
        second.kill()


def test_kill_9_during_a_burst_of_misses_then_restart(crashed):
    report = crashed.report
    assert report.passed, report  # every entry passes its checksum; bookkeeping consistent
    assert report.entries >= 12 and report.ok == report.entries
    hits = read_back(crashed.server.address, crashed.inputs, crashed.acked)
    assert hits >= 4  # entries committed before the kill are served exactly as acknowledged
    with Client(crashed.server.address) as client:  # and the restarted server serves
        fresh = client.extract(images(1, seed=99), MODEL, layers=LAYERS, pooling="none")
        assert fresh["features"].shape == (1, 1280, 7, 7) and not fresh.cached["logits"].any()
        assert client.cache_stats().corrupt == 0


def test_two_servers_share_one_directory_and_sigterm_commits_every_acknowledged_entry(crashed):
    second = crashed.server
    # Beside the running one, on the same data directory.
    third = ServerProcess(crashed.data, "--cache-audit-fraction", "0", name="third").start()
    try:
        new = images(3, seed=3)
        with Client(second.address) as c2, Client(third.address) as c3:
            computed = c2.extract(new, MODEL, layers=LAYERS, pooling="none")
            assert not computed.cached["features"].any()
            deadline = time.monotonic() + 30
            while c2.cache_stats().pending_writes:  # committed by one process ...
                assert time.monotonic() < deadline
                time.sleep(0.02)
            seen = c3.extract(new, MODEL, layers=LAYERS, pooling="none")  # ... read by the other
            assert seen.cached["features"].all() and seen.cached["logits"].all()
            assert seen["features"].tobytes() == computed["features"].tobytes()

            # Both write at once; then one purges everything, and the other sees it.
            done_2: dict[int, dict[str, bytes]] = {}
            done_3: dict[int, dict[str, bytes]] = {}
            more_2, more_3 = images(6, seed=4), images(6, seed=5)
            threads = burst(second.address, more_2, done_2, threading.Event(), workers=2)
            threads += burst(third.address, more_3, done_3, threading.Event(), workers=2)
            for t in threads:
                t.join(300)
            assert len(done_2) == len(done_3) == 6
            assert c3.purge_cache() >= 2 * (3 + 6 + 6)
            assert (
                not c2.extract(new[:1], MODEL, layers=LAYERS, pooling="none")
                .cached["features"]
                .any()
            )

            # A burst, then SIGTERM right after the last acknowledgement (writes still queued):
            # every acknowledged entry is on disk afterwards, byte for byte.
            last = images(12, seed=6)
            done: dict[int, dict[str, bytes]] = {}
            for t in burst(second.address, last, done, threading.Event()):
                t.join(300)
            fingerprint = computed.model.fingerprint
        assert len(done) == len(last)
        assert second.terminate() == 0 and third.terminate() == 0
        on_disk = stored(crashed.data / "cache", fingerprint, last)
        assert on_disk == [done[i] for i in range(len(last))]
        assert verify_cache(crashed.data / "cache").passed
    finally:
        third.kill()
