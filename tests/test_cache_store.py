"""The LMDB cache on its own (no model): bound and eviction, map growth, the write queue,
purge, corruption, and several processes on one directory, including kill -9 mid-write."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedwarden.server import FailedPrecondition
from embedwarden.server._metrics import METRICS
from embedwarden.server.cache import _db as cache_db
from embedwarden.server.cache._lmdb import LmdbCache, verify_cache

FP_A = hashlib.sha256(b"version A").hexdigest()
FP_B = hashlib.sha256(b"version B").hexdigest()
MIB = 1 << 20


def keys_for(cache: LmdbCache, fp: str, start: int, n: int) -> list[bytes]:
    digests = [i.to_bytes(32, "little") for i in range(start, start + n)]
    return cache.keys(fp, "features", "avg", "float32", False, digests)


def vectors(n: int, size: int = 1280, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(np.float32) for _ in range(n)]


def counter(name: str, labels: dict[str, str] | None = None) -> float:
    return METRICS.sample(name, labels) or 0.0


def last_txn(cache: LmdbCache) -> int:
    return int(cache.db.env.info()["last_txnid"])


def store_batch(cache: LmdbCache, b: int, n: int = 8) -> list[bytes]:
    """Batch `b` of `n` entries, as one request's misses queue them; their keys."""
    keys = keys_for(cache, FP_A, n * b, n)
    cache.store(FP_A, list(zip(keys, vectors(n, seed=b), strict=True)))
    return keys


@contextmanager
def opened(tmp_path: Path, **options: Any) -> Iterator[LmdbCache]:
    cache = LmdbCache(tmp_path / "c", 64 * MIB, **options)
    try:
        yield cache
    finally:
        cache.close()


def wait_committed(cache: LmdbCache, started: float, what: str) -> None:
    while cache.stats().pending_writes:
        assert time.monotonic() - started < 30, what
        time.sleep(0.01)


def assert_reopened_holds(path: Path, keys: list[bytes], arrays: list[np.ndarray]) -> None:
    reopened = LmdbCache(path, 64 * MIB)
    try:
        found = reopened.lookup(keys)
        assert all(
            f is not None and f.tobytes() == a.tobytes() for f, a in zip(found, arrays, strict=True)
        )
    finally:
        reopened.close()


def test_a_tiny_bound_evicts_least_recently_used_and_never_fails(tmp_path):
    cache = LmdbCache(tmp_path / "c", MIB)  # the smallest bound
    evictions_before = counter("embedwarden_cache_evictions_total")
    try:
        hot = keys_for(cache, FP_A, 0, 8)
        cache.store(FP_A, list(zip(hot, vectors(8, seed=1), strict=True)))
        batches = []
        for b in range(40):  # ~40 x 16 x 8 KiB = 5 MiB through a 1 MiB cache
            keys = keys_for(cache, FP_A, 1000 + 16 * b, 16)
            cache.store(FP_A, list(zip(keys, vectors(16, seed=b), strict=True)))
            batches.append(keys)
            assert cache.flush(30)
            assert all(v is not None for v in cache.lookup(hot))  # used: kept recent
            assert cache.flush(30)
        stats = cache.stats()
        assert stats.evictions > 0 and stats.dropped_writes == 0
        assert counter("embedwarden_cache_evictions_total") - evictions_before == stats.evictions
        assert stats.used_bytes <= MIB and stats.map_bytes <= MIB
        assert (tmp_path / "c" / "data.mdb").stat().st_size <= MIB
        assert all(v is not None for v in cache.lookup(batches[-1]))  # newest kept
        assert all(v is None for v in cache.lookup(batches[0]))  # oldest unused evicted
        assert all(v is not None for v in cache.lookup(hot))
        assert stats.versions == [(FP_A, stats.entries)]
        report = cache.db.verify()
        assert report.passed and report.entries == stats.entries
    finally:
        cache.close()


def test_the_map_grows_on_demand_up_to_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_db, "INITIAL_MAP_BYTES", MIB)
    cache = LmdbCache(tmp_path / "c", 16 * MIB)
    try:
        assert cache.stats().map_bytes == MIB
        for b in range(12):  # ~12 x 8 x 100 KiB = 9.6 MiB, below the eviction threshold
            keys = keys_for(cache, FP_A, 100 * b, 8)
            cache.store(FP_A, list(zip(keys, vectors(8, 25_600, seed=b), strict=True)))
            assert cache.flush(30)
        stats = cache.stats()
        assert stats.map_bytes == 16 * MIB  # doubled 1 -> 2 -> 4 -> 8 -> 16
        assert stats.entries == 96 and stats.evictions == 0 and stats.dropped_writes == 0
    finally:
        cache.close()


def test_a_full_write_queue_drops_and_counts_without_blocking(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB, max_pending_bytes=64 * 1024)
    release = threading.Event()
    blocked = cache._writer.call(release.wait)  # the writer is busy: nothing drains
    dropped_before = counter("embedwarden_cache_dropped_writes_total")
    try:
        batches = [keys_for(cache, FP_A, 4 * b, 4) for b in range(10)]  # ~21 KiB each
        slowest = 0.0
        for b, keys in enumerate(batches):
            started = time.perf_counter()
            cache.store(FP_A, list(zip(keys, vectors(4, seed=b), strict=True)))
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.05  # never waits for the writer
        assert cache.stats().pending_writes == 12  # 3 batches fit in 64 KiB
        assert cache.stats().dropped_writes == 28
        assert counter("embedwarden_cache_dropped_writes_total") - dropped_before == 28
    finally:
        release.set()
        blocked.result(10)
    assert cache.flush(30)
    found = cache.lookup([k for keys in batches for k in keys])
    assert [v is not None for v in found] == [True] * 12 + [False] * 28
    cache.close()


def test_writes_queued_meanwhile_commit_as_one_group(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB)
    try:
        release = threading.Event()
        cache._writer.call(release.wait)
        for b in range(10):  # ten requests' worth of misses while a commit is running
            store_batch(cache, b)
        before = last_txn(cache)
        release.set()
        assert cache.flush(30)
        assert last_txn(cache) == before + 1  # one transaction, one fsync
        assert cache.stats().entries == 80
    finally:
        cache.close()


def test_lone_writes_arriving_apart_share_one_commit_and_a_flush_ends_the_wait(tmp_path):
    with opened(tmp_path, linger_s=30.0) as cache:
        before = last_txn(cache)
        for b in range(3):  # three lone misses, 50 ms apart
            store_batch(cache, b)
            time.sleep(0.05)
        assert last_txn(cache) == before  # still waiting for company
        assert cache.stats().pending_writes == 24
        started = time.monotonic()
        assert cache.flush(10)  # well before the 30 s linger is up
        assert time.monotonic() - started < 10
        assert last_txn(cache) == before + 1  # one transaction, one fsync, for all three
        assert cache.stats().entries == 24


def test_a_lingering_write_commits_when_its_linger_is_up(tmp_path):
    with opened(tmp_path, linger_s=0.3) as cache:
        started = time.monotonic()
        keys = store_batch(cache, 0, 4)
        wait_committed(cache, started, "the lingering write was never committed")
        assert time.monotonic() - started >= 0.29  # not before its linger was up
        assert all(v is not None for v in cache.lookup(keys))


def test_a_full_group_commits_without_lingering(tmp_path):
    with opened(tmp_path, max_group_bytes=64 * 1024, linger_s=60.0) as cache:
        started = time.monotonic()
        store_batch(cache, 0, 16)  # 16 x 5 KiB: more than a group holds
        wait_committed(cache, started, "a full group waited out its linger")
        assert cache.stats().entries == 16


def test_a_control_job_queued_among_lingering_writes_runs_without_waiting(tmp_path):
    with opened(tmp_path, linger_s=60.0) as cache:
        store_batch(cache, 0)
        control = cache._writer.call(lambda: cache.stats().entries)  # as a purge is queued
        store_batch(cache, 1)  # and a write after it
        assert control.result(timeout=30) == 8  # the write before it committed, then it ran
        assert cache.flush(30) and cache.stats().entries == 16


def test_close_ends_a_linger_and_commits(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB, linger_s=60.0)
    keys = keys_for(cache, FP_A, 0, 8)
    arrays = vectors(8)
    cache.store(FP_A, list(zip(keys, arrays, strict=True)))
    started = time.monotonic()
    cache.close()
    assert time.monotonic() - started < 30
    assert_reopened_holds(tmp_path / "c", keys, arrays)


def test_close_commits_every_queued_write(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB)
    release = threading.Event()
    cache._writer.call(release.wait)
    keys = keys_for(cache, FP_A, 0, 64)
    arrays = vectors(64)
    for i in range(0, 64, 8):
        cache.store(FP_A, list(zip(keys[i : i + 8], arrays[i : i + 8], strict=True)))
    assert cache.stats().pending_writes == 64
    threading.Timer(0.2, release.set).start()
    cache.close()  # waits for the writer, which drains the queue
    assert_reopened_holds(tmp_path / "c", keys, arrays)


def test_a_cache_of_another_format_version_is_cleared_on_open(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB)
    keys = keys_for(cache, FP_A, 0, 8)
    cache.store(FP_A, list(zip(keys, vectors(8), strict=True)))
    cache.close()
    db = cache_db.CacheDB(tmp_path / "c", 64 * MIB)
    with db.env.begin(write=True) as txn:  # as an older release (zlib CRC-32 entries) left it
        txn.put(b"format", b"1", db=db._meta)
    db.close()
    reopened = LmdbCache(tmp_path / "c", 64 * MIB)
    try:
        assert reopened.stats().entries == 0
        assert reopened.lookup(keys) == [None] * 8
    finally:
        reopened.close()
    assert verify_cache(tmp_path / "c").passed


def test_purge_one_version_leaves_the_others(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB)
    try:
        a, b = keys_for(cache, FP_A, 0, 50), keys_for(cache, FP_B, 0, 30)
        cache.store(FP_A, list(zip(a, vectors(50), strict=True)))
        cache.store(FP_B, list(zip(b, vectors(30), strict=True)))
        assert cache.flush(30)
        assert sorted(cache.stats().versions) == sorted([(FP_A, 50), (FP_B, 30)])
        assert cache.purge(FP_A) == 50  # runs after the queued writes
        assert all(v is None for v in cache.lookup(a))
        assert all(v is not None for v in cache.lookup(b))
        assert cache.stats().versions == [(FP_B, 30)] and cache.stats().entries == 30
        assert cache.db.verify().passed
        assert cache.purge() == 30 and cache.stats().entries == 0
        assert cache.stats().versions == [] and cache.db.verify().passed
    finally:
        cache.close()


def test_a_corrupt_entry_is_never_served_counted_and_rewritten(tmp_path):
    path = tmp_path / "c"
    cache = LmdbCache(path, 64 * MIB)
    keys = keys_for(cache, FP_A, 0, 3)
    marker = np.full(1280, 1234.5, np.float32)
    arrays = [vectors(1)[0], marker, vectors(1, seed=2)[0]]
    cache.store(FP_A, list(zip(keys, arrays, strict=True)))
    cache.close()
    # Bit rot on disk: flip one byte inside the stored payload of the marked entry.
    data = bytearray((path / "data.mdb").read_bytes())
    where = data.find(marker.tobytes())
    assert where > 0
    data[where + 100] ^= 0x01
    (path / "data.mdb").write_bytes(bytes(data))

    report = verify_cache(path)  # the offline pass finds exactly that entry
    assert report.entries == 3 and report.ok == 2 and len(report.corrupt) == 1
    assert report.corrupt[0].startswith(keys[1].hex()) and "checksum" in report.corrupt[0]

    corrupt_before = counter("embedwarden_cache_lookups_total", {"result": "corrupt"})
    cache = LmdbCache(path, 64 * MIB)
    try:
        found = cache.lookup(keys)
        assert found[1] is None  # a miss, never the damaged bytes
        assert found[0] is not None and found[2] is not None
        assert cache.stats().corrupt == 1 and cache.stats().hits == 2
        assert counter("embedwarden_cache_lookups_total", {"result": "corrupt"}) == (
            corrupt_before + 1
        )
        cache.store(FP_A, [(keys[1], marker)])  # what extraction does with the recomputation
        assert cache.flush(30)
        assert cache.lookup([keys[1]])[0].tobytes() == marker.tobytes()
        assert cache.db.verify().passed
    finally:
        cache.close()


def test_one_directory_opens_once_per_process(tmp_path):
    cache = LmdbCache(tmp_path / "c", 64 * MIB)
    try:
        with pytest.raises(FailedPrecondition, match="already open in this process"):
            LmdbCache(tmp_path / "c", 64 * MIB)
    finally:
        cache.close()
    LmdbCache(tmp_path / "c", 64 * MIB).close()  # closing released it


WRITER = """
import sys, time
import numpy as np
from pathlib import Path
from embedwarden.server.cache import _db as _cache_db
_cache_db.INITIAL_MAP_BYTES = 1 << 20  # small, so that this process grows the map
from embedwarden.server.cache._lmdb import LmdbCache
path, bound, fp, seed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cache = LmdbCache(path, bound)
rng = np.random.default_rng(seed)
i = 0
print("ready", flush=True)
while True:
    batch = []
    for _ in range(16):
        digest = (seed * 10**9 + i).to_bytes(32, "little")
        batch.append((cache.keys(fp, "features", "none", "float32", False, [digest])[0],
                      rng.standard_normal(3000).astype(np.float32)))
        i += 1
    cache.store(fp, batch)
    time.sleep(0.002)
"""


def start_writer(path: Path, bound: int, seed: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(bound), FP_B, str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_processes_share_a_directory_and_survive_a_writer_killed_mid_commit(tmp_path, monkeypatch):
    """Another process writes bursts (growing the map, evicting) while this one reads and
    writes; the other is killed with SIGKILL at random moments, mid-commit at times. This
    process never hangs on LMDB's writer lock, follows the map, and nothing corrupt appears."""
    monkeypatch.setattr(cache_db, "INITIAL_MAP_BYTES", MIB)
    path, bound = tmp_path / "shared", 24 * MIB
    cache = LmdbCache(path, bound)
    rng = np.random.default_rng(7)
    try:
        for cycle in range(3):
            proc = start_writer(path, bound, seed=cycle + 1)
            first = cache.keys(
                FP_B,
                "features",
                "none",
                "float32",
                False,
                [((cycle + 1) * 10**9).to_bytes(32, "little")],
            )
            deadline = time.monotonic() + 30
            while cache.lookup(first)[0] is None:  # the other process's commit is visible here
                assert time.monotonic() < deadline, "entries of the other process never appeared"
                time.sleep(0.02)
            mine = keys_for(cache, FP_A, 1000 * cycle, 32)
            arrays = vectors(32, seed=cycle)
            cache.store(FP_A, list(zip(mine, arrays, strict=True)))
            time.sleep(float(rng.uniform(0.05, 0.5)))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
            assert cache.flush(30), "this process's writer hung after the other died"
            more = keys_for(cache, FP_A, 1000 * cycle + 500, 8)
            cache.store(FP_A, list(zip(more, vectors(8), strict=True)))
            assert cache.flush(30)
            assert all(v is not None for v in cache.lookup(more))
            report = cache.db.verify()
            assert report.passed, report
            assert report.entries > 0
        stats = cache.stats()
        assert stats.map_bytes > MIB  # followed the map that the other process grew
        assert stats.used_bytes <= bound
    finally:
        cache.close()
    assert verify_cache(path).passed
