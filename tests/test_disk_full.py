"""A real server whose data dir is a real 40 MB filesystem (tmpfs; CI runs as root): the cache
stops growing with the reserve still free, a disk filled by something else makes index writes
answer RESOURCE_EXHAUSTED (never INTERNAL) while extraction and search go on, writes succeed
again once space is freed, and after kill -9 every acknowledged upsert is there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ServerProcess

from embedwarden.client import Client, EmbedwardenError, ResourceExhausted
from embedwarden.server._metrics import METRICS
from embedwarden.server.cache import LmdbCache
from embedwarden.server.cache._format import KeyMaker

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
DISK = 40 * 1024 * 1024
RESERVE = 6_000_000
ITEM = 32 * 112 * 112 * 4  # layer `stem`, pooling none: 1.6 MB per cached item


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture()
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, 1280)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def settle(client: Client) -> int:
    """Waits for the cache's queued writes; returns its entry count."""
    for _ in range(200):
        stats = client.cache_stats()
        if stats.pending_writes == 0:
            return int(stats.entries)
    raise AssertionError("cache writes still pending")


def fill(path: Path, leave: int) -> None:
    """Another cause fills the disk: a file that leaves `leave` bytes free (or none)."""
    with open(path, "wb") as f:
        try:
            f.write(b"\0" * max(free(path.parent) - leave, 0))
            f.flush()
        except OSError:
            pass


def test_a_full_disk_degrades_cleanly_and_loses_nothing_acknowledged(disk: Path) -> None:
    args = ("--min-free-disk-bytes", str(RESERVE), "--index-snapshot-interval-s", "1")
    server = ServerProcess(disk, *args).start()
    codes: list[grpc.StatusCode] = []
    acked: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)

    def upsert(client: Client, name: str, ids: list[str], fingerprint: str) -> bool:
        vectors = unit(rng, len(ids))
        try:
            client.upsert(name, ids, vectors, fingerprint=fingerprint)
        except ResourceExhausted as exc:
            codes.append(exc.code)
            assert str(disk) in exc.details and "bytes free" in exc.details, exc
            return False
        if name == "photos":
            acked.update(zip(ids, vectors, strict=True))
        return True

    def extract(client: Client) -> None:
        images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
        result = client.extract(images, MODEL, layers=["stem"], pooling="none")
        assert result["stem"].shape == (4, 32, 112, 112)

    try:
        with Client(server.address, timeout=60, retries=0) as client:
            # 1. Large maps until the cache stops growing: the reserve stays free.
            sizes = []
            for i in range(16):
                extract(client)
                settle(client)
                assert free(disk) >= RESERVE, (i, free(disk))
                sizes.append((disk / "cache" / "data.mdb").stat().st_blocks * 512)
            assert 64 * ITEM > DISK  # more was computed than the disk could hold
            assert sizes[-1] == sizes[-5] and sizes[-1] > sizes[0], sizes  # stopped growing
            stats = client.cache_stats()
            assert stats.evictions > 0 and stats.max_bytes < DISK
            print(
                f"\ncache file {sizes[-1]:,} bytes (bound {stats.max_bytes:,}, live "
                f"{stats.used_bytes:,}, {stats.entries} entries, {stats.evictions} evicted), "
                f"{free(disk):,} bytes free of {DISK:,} (reserve {RESERVE:,})"
            )

            # 2. The disk fills from another cause: index writes are refused cleanly.
            fill(disk / "filler", 1_500_000)
            info = client.create_collection("photos", MODEL, kind="flat")
            results = [
                upsert(client, "photos", [f"a{s}-{j}" for j in range(200)], info.fingerprint)
                for s in range(6)
            ]  # 1 MB each
            assert not all(results), "the disk never filled"
            fill(disk / "filler-2", 0)  # not a byte left
            try:
                second = client.create_collection("second", MODEL, kind="flat")
                assert not upsert(
                    client, "second", [f"x{j}" for j in range(200)], second.fingerprint
                )
            except ResourceExhausted as exc:
                codes.append(exc.code)
                assert str(disk) in exc.details and "bytes free" in exc.details, exc
            # Extraction and search keep serving; snapshots and cache writes fail quietly.
            for _ in range(4):
                extract(client)
            settle(client)
            # ... the cache's bound fell with the free space, and its file did not grow.
            assert client.cache_stats().max_bytes < stats.max_bytes
            assert (disk / "cache" / "data.mdb").stat().st_blocks * 512 <= sizes[-1]
            some = sorted(acked)[:5]
            assert [h[0].id for h in client.search("photos", ids=some, k=1)] == some
            time.sleep(3)  # three maintenance ticks with a snapshot due and no room for it

            # 3. Space freed: writes succeed again, no restart.
            (disk / "filler").unlink()
            (disk / "filler-2").unlink()
            assert upsert(client, "photos", [f"b-{j}" for j in range(200)], info.fingerprint)
    except EmbedwardenError as exc:
        pytest.fail(f"unexpected {exc}")
    finally:
        server.kill()  # 4. kill -9

    restarted = ServerProcess(disk, *args).start()
    try:
        with Client(restarted.address, timeout=60) as client:
            size = -1
            for _ in range(300):
                try:
                    size = client.describe_collection("photos").size
                    break
                except EmbedwardenError as exc:
                    assert exc.code is grpc.StatusCode.UNAVAILABLE, exc
                    time.sleep(0.1)
            assert size == len(acked)
            order = sorted(acked)
            hits = client.search(
                "photos", np.stack([acked[i] for i in order]), k=1, fingerprint=info.fingerprint
            )
            assert [h[0].id for h in hits] == order
    finally:
        restarted.kill()
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    text = server.log.read_text()
    assert "internal error" not in text.lower() and "Traceback" not in text, text[-3000:]
    # Once per interval, not once per failed attempt (snapshots were due every second).
    for what in ("cache write failed", "snapshot failed"):
        assert len(re.findall(what, text)) <= 2, (what, text[-3000:])


def cache_failures() -> float:
    return sum(
        METRICS.sample("embedwarden_storage_write_failures_total", {"store": "cache", "reason": r})
        or 0.0
        for r in ("disk_full", "no_room", "error")
    )


def test_cache_write_failures_are_counted_and_logged_once_per_interval(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fingerprint = "ab" * 32
    keys = KeyMaker().many(
        fingerprint, "stem", "none", "float32", False, [bytes([i]) * 32 for i in range(21)]
    )
    array = np.ones((32, 112, 112), np.float32)
    cache = LmdbCache(disk / "cache", 1 << 30, reserve=0)
    try:
        fill(disk / "filler", 0)  # another cause took every byte
        before = cache_failures()
        with caplog.at_level("WARNING", logger="embedwarden.server.cache._lmdb"):
            for key in keys[:20]:
                cache.store(fingerprint, [(key, array)])
                assert cache.flush(30)
            failed = [r.getMessage() for r in caplog.records if "cache write" in r.getMessage()]
            assert cache_failures() - before == 20  # every failed group commit counted
            assert len(failed) == 1 and "failed 1 time(s)" in failed[0], failed
            assert cache.lookup(keys[:20]) == [None] * 20  # served nothing it did not store
            (disk / "filler").unlink()  # space freed: the next write works, no restart
            cache.store(fingerprint, [(keys[20], array)])
            assert cache.flush(30)
            got = cache.lookup([keys[20]])[0]
            assert got is not None and np.array_equal(got, array)
            back = [r.getMessage() for r in caplog.records if "works again" in r.getMessage()]
            assert back == ["cache write works again (19 more failure(s) before)"], back
    finally:
        cache.close()


def test_a_read_only_data_dir_is_a_clear_error_at_start(disk: Path) -> None:
    (disk / "cache").mkdir()  # what an earlier run left
    remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
    assert remount.returncode == 0, remount.stderr
    args = ["--data-dir", str(disk), "--port", "0", "--metrics-port", "-1", "--models", ""]
    done = subprocess.run(
        [sys.executable, "-m", "embedwarden.server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"the data directory {disk} is not writable (Read-only file system)" in done.stderr


def test_a_golden_record_on_a_full_disk_is_resource_exhausted_until_space_is_freed(
    disk: Path,
) -> None:
    server = ServerProcess(disk, "--models", "").start()  # nothing loaded, nothing recorded
    try:
        fill(disk / "filler", 0)
        with Client(server.address, timeout=300, retries=0) as client:
            with pytest.raises(ResourceExhausted) as refused:
                client.load_model(MODEL)  # its first load writes the golden record (~8 MB)
            assert str(disk) in refused.value.details and "bytes free" in refused.value.details
            assert "golden" in refused.value.details
            assert not list((disk / "golden").glob(f"{MODEL}@1-*"))  # nothing half-written
            assert not list((disk / "golden").glob(".tmp-*"))
            (disk / "filler").unlink()
            client.load_model(MODEL)  # the same server, once there is room
            assert client.health(f"model:{MODEL}@1") == "SERVING"
    finally:
        server.kill()
    assert "Traceback" not in server.log.read_text()
