"""Crash loop: a mixed workload (extract, upsert, remove, search) while the server is killed with
`kill -9` at random moments; after every restart nothing acknowledged is lost, no cache entry
fails its checksum, and every consistency check passes."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from helpers import ServerProcess, encode

from embedwarden.client import Client, EmbedwardenError, NotFound
from embedwarden.server.cache._lmdb import verify_cache

MODEL = "efficientnet_lite0"
COLLECTION = "crash"
CYCLES = 4


@dataclass
class Ledger:
    """What the server acknowledged, and what was in flight when it died."""

    upserted: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    uncertain: set[str] = field(default_factory=set)  # a remove was in flight at the kill
    extracted: int = 0
    searches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _workload(
    address: str, fingerprint: str, ledger: Ledger, cycle: int, stop: threading.Event
) -> list[threading.Thread]:
    rng = np.random.default_rng(cycle)
    images = [encode(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(64)]

    def upserter() -> None:
        with Client(address, retries=0, timeout=30) as c:
            n = 0
            while not stop.is_set():
                ids = [f"c{cycle}-u{n}-{k}" for k in range(16)]
                vectors = np.random.default_rng([cycle, n]).standard_normal((16, 1280))
                vectors = vectors.astype(np.float32)
                n += 1
                try:
                    c.upsert(COLLECTION, ids, vectors, fingerprint=fingerprint)
                except EmbedwardenError:
                    return  # the server died: this request may or may not have landed
                with ledger.lock:
                    ledger.upserted.update(ids)

    def remover() -> None:
        with Client(address, retries=0, timeout=30) as c:
            while not stop.is_set():
                with ledger.lock:
                    candidates = sorted(ledger.upserted - ledger.removed - ledger.uncertain)
                if len(candidates) < 8:
                    time.sleep(0.05)
                    continue
                victims = random.Random(len(candidates)).sample(candidates, 4)
                with ledger.lock:
                    ledger.uncertain.update(victims)
                try:
                    c.remove(COLLECTION, victims)
                except EmbedwardenError:
                    return
                with ledger.lock:
                    ledger.removed.update(victims)
                    ledger.uncertain.difference_update(victims)

    def extractor() -> None:
        with Client(address, retries=0, timeout=30) as c:
            i = 0
            while not stop.is_set():
                batch = [images[(i + k) % len(images)] + bytes([cycle, i % 256]) for k in range(4)]
                i += 4
                try:
                    c.extract(batch, MODEL)
                except EmbedwardenError:
                    return
                with ledger.lock:
                    ledger.extracted += len(batch)

    def searcher() -> None:
        with Client(address, retries=0, timeout=30) as c:
            while not stop.is_set():
                queries = np.random.default_rng(7).standard_normal((4, 1280)).astype(np.float32)
                try:
                    c.search(COLLECTION, queries, k=5, fingerprint=fingerprint)
                except EmbedwardenError:
                    return
                with ledger.lock:
                    ledger.searches += 1

    threads = [threading.Thread(target=f) for f in (upserter, remover, extractor, searcher)]
    for t in threads:
        t.start()
    return threads


def _wait_for_a_first_extraction(ledger: Ledger, timeout: float = 120.0) -> None:
    """Kills start once the cache has something to lose (on a loaded machine the first
    requests can take longer than the first kill's delay)."""
    deadline = time.monotonic() + timeout
    while ledger.extracted == 0:
        assert time.monotonic() < deadline, "no extraction was acknowledged"
        time.sleep(0.05)


def _verify(address: str, data_dir, ledger: Ledger, fingerprint: str) -> None:
    with Client(address, timeout=120) as c:
        present = sorted(ledger.upserted - ledger.removed - ledger.uncertain)
        for start in range(0, len(present), 256):
            chunk = present[start : start + 256]
            results = c.search(COLLECTION, ids=chunk, k=1)
            lost = [
                i
                for i, hits in zip(chunk, results.hits, strict=True)
                if not hits or hits[0].id != i
            ]
            assert not lost, f"acknowledged upserts lost after kill -9: {lost[:5]}"
        for gone in sorted(ledger.removed)[:50]:
            with pytest.raises(NotFound):
                c.search(COLLECTION, ids=[gone], k=1)
        report = c.check_consistency()
        assert report.passed, [r for r in report.results if not r.passed]
    cache = verify_cache(data_dir / "cache")
    assert cache.passed and cache.entries > 0, (cache.corrupt[:3], cache.problems[:3])


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_acknowledged(tmp_path):
    data_dir = tmp_path / "data"
    ledger = Ledger()
    chaos = random.Random(2026)
    server = ServerProcess(data_dir, "--index-snapshot-interval-s", "0.5").start()
    with Client(server.address) as c:
        fingerprint = c.create_collection(COLLECTION, MODEL).fingerprint
    try:
        for cycle in range(CYCLES):
            stop = threading.Event()
            threads = _workload(server.address, fingerprint, ledger, cycle, stop)
            if cycle == 0:  # the first pass of a shape also traces it (~0.4 s a lane)
                _wait_for_a_first_extraction(ledger)
            time.sleep(chaos.uniform(1.0, 3.0))
            server.kill()  # SIGKILL in the middle of everything
            stop.set()
            for t in threads:
                t.join(60)
            server = ServerProcess(data_dir, "--index-snapshot-interval-s", "0.5").start()
            _verify(server.address, data_dir, ledger, fingerprint)
        assert len(ledger.upserted) > 100 and ledger.removed and ledger.extracted > 0
        print(
            f"\n{CYCLES} kill -9 cycles: {len(ledger.upserted)} upserts and "
            f"{len(ledger.removed)} removals acknowledged, none lost; {ledger.extracted} "
            f"images extracted, {ledger.searches} searches"
        )
    finally:
        server.kill()
