"""The LMDB embedding cache: content-addressed, checksummed, bounded, written off the request
path. Implements `serving.EmbeddingCache`.

A hit costs the input's SHA-256, one read transaction for the whole request and a checksum per
entry; no decoding and no model. A corrupt entry is counted, never served, and overwritten by
the recomputed value. Misses are queued for the group-commit writer; a full queue drops the
write (counted in `cache_dropped_writes_total`) instead of slowing the request.

What an acknowledged request guarantees about its entries (the README's "Cache" section):
entries are committed shortly after the response, not before it. A crash (kill -9, power loss)
may lose entries whose group commit had not finished; it never leaves a partial or corrupt one
that could be served. A graceful shutdown commits everything queued. Each entry that exists
holds exactly the bytes some response returned for its key.

Layout on disk and the LRU approximation: `_format` and `_db`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from .._metrics import METRICS
from .._settings import Settings
from .._storage import FailureLog, free_bytes, is_disk_full, reserve_bytes
from ._db import CacheDB, VerifyReport
from ._format import CorruptEntry, KeyMaker, decode_entry, encode_entry
from ._writer import GroupCommitWriter

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 256 << 20  # queued writes, at most; also at most half the size bound
MAX_GROUP_BYTES = 32 << 20  # one commit, at most; also at most 1/8 of the size bound
# How long a lone write waits for others to share its commit (see `_writer`; the server's
# `--cache-commit-linger-ms`). An entry becomes visible to lookups up to this much later; a
# repeat within it is computed again, identically.
COMMIT_LINGER_S = 0.1
ENTRY_OVERHEAD = 128  # queue accounting per entry beyond its array
TOUCH_BYTES = 48


@dataclass(frozen=True)
class _Store:
    fingerprint: str
    entries: list[tuple[bytes, np.ndarray]]
    created: float


@dataclass(frozen=True)
class _Touch:
    keys: list[bytes]


@dataclass
class CacheStats:
    enabled: bool
    path: str
    entries: int = 0
    used_bytes: int = 0
    max_bytes: int = 0
    map_bytes: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    dropped_writes: int = 0
    pending_writes: int = 0
    versions: list[tuple[str, int]] = field(default_factory=list)  # (fingerprint, entries)


class LmdbCache:
    """The server's embedding cache. `lookup` may be called from any thread; `store` never
    blocks; `close` commits everything queued."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        max_pending_bytes: int | None = None,
        max_group_bytes: int | None = None,
        reserve: int | None = None,
        linger_s: float = COMMIT_LINGER_S,
    ) -> None:
        """`reserve`: bytes to leave free on the filesystem (None: bounded by `max_bytes`)."""
        self.path = path
        self.db = CacheDB(path, max_bytes, reserve_bytes=reserve)
        self._failures = FailureLog(log, "cache write")
        self.keys = KeyMaker().many
        bound = self.db.max_bytes
        self.hits = self.misses = self.corrupt = self.evictions = self.dropped = 0
        self._m_hit = METRICS.cache_lookups.labels("hit")
        self._m_miss = METRICS.cache_lookups.labels("miss")
        self._m_corrupt = METRICS.cache_lookups.labels("corrupt")
        self._closed = False
        self._writer = GroupCommitWriter(
            self._commit,
            max_pending_bytes=max_pending_bytes or min(MAX_PENDING_BYTES, bound // 2),
            max_group_bytes=max_group_bytes or min(MAX_GROUP_BYTES, bound // 8),
            idle=self._maintain,
            linger_s=linger_s,
        )
        self._update_gauges()
        log.info(
            "cache at %s: %d entries, bound %d bytes (now %d, leaving %s bytes free on its disk)",
            path,
            self.db.stats().entries,
            bound,
            self.db.bound_bytes,
            "no" if reserve is None else f"{reserve:,}",
        )

    # --- the EmbeddingCache protocol ----------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """Verified arrays (None for a miss or a corrupt entry), all read in one transaction."""
        if self._closed or not keys:
            return [None] * len(keys)
        try:
            values, stale = self.db.get_many(keys)
        except lmdb.Error as exc:  # a broken disk must not fail requests: compute instead
            log.error("cache read failed, serving without the cache: %s", exc)
            self.misses += len(keys)
            self._m_miss.inc(len(keys))
            return [None] * len(keys)
        out: list[np.ndarray | None] = []
        bad: set[bytes] = set()
        for key, value in zip(keys, values, strict=True):
            if value is None:
                out.append(None)
                continue
            try:
                out.append(decode_entry(key, value))
            except CorruptEntry as exc:
                out.append(None)
                bad.add(key)
                log.warning("cache entry %s is corrupt (%s): recomputing it", key.hex(), exc)
        missing = values.count(None)
        found = len(keys) - missing - len(bad)
        self.hits += found
        self.misses += missing
        if found:
            self._m_hit.inc(found)
        if missing:
            self._m_miss.inc(missing)
        if bad:
            self.corrupt += len(bad)
            self._m_corrupt.inc(len(bad))
            stale = [k for k in stale if k not in bad]
        if stale:  # used again: move to the current generation (best effort, never blocks)
            self._writer.submit(_Touch(stale), TOUCH_BYTES * len(stale), 0)
        return out

    def store(self, fingerprint: str, entries: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Queues entries for the next group commit; drops (and counts) them when full."""
        if not entries:
            return
        nbytes = sum(a.nbytes for _, a in entries) + ENTRY_OVERHEAD * len(entries)
        job = _Store(fingerprint, list(entries), time.time())
        if self._closed or not self._writer.submit(job, nbytes, len(entries)):
            self.dropped += len(entries)
            METRICS.cache_dropped_writes.inc(len(entries))

    # --- control ------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued write is committed."""
        return self._writer.flush(timeout)

    def purge(self, fingerprint: str | None = None) -> int:
        """Deletes all entries, or one model version's; after the writes queued before it.
        Blocks until done (call it from a worker thread)."""
        removed = int(self._writer.call(lambda: self.db.purge(fingerprint)).result())
        self._update_gauges()
        log.info("cache: purged %d entries (%s)", removed, fingerprint or "all versions")
        return removed

    def stats(self) -> CacheStats:
        s = self.db.stats()
        return CacheStats(
            enabled=True,
            path=str(self.path),
            entries=s.entries,
            used_bytes=s.live_bytes,
            max_bytes=s.max_bytes,
            map_bytes=s.map_bytes,
            hits=self.hits,
            misses=self.misses,
            corrupt=self.corrupt,
            evictions=self.evictions,
            dropped_writes=self.dropped,
            pending_writes=self._writer.pending_items,
            versions=s.versions,
        )

    def close(self, timeout: float | None = None) -> None:
        """Commits every queued write, then closes the database."""
        if self._closed:
            return
        self._closed = True
        if not self._writer.close(timeout):
            log.error("cache writer did not finish within %ss; closing anyway", timeout)
        self.db.close()

    # --- the writer thread --------------------------------------------------------------------

    def _commit(self, jobs: list[_Store | _Touch]) -> None:
        records: list[tuple[bytes, bytes]] = []
        touches: list[bytes] = []
        for job in jobs:
            if isinstance(job, _Touch):
                touches.extend(job.keys)
                continue
            for key, array in job.entries:
                try:
                    records.append((key, encode_entry(key, job.fingerprint, array, job.created)))
                except ValueError as exc:
                    log.warning("not caching %s: %s", key.hex(), exc)
        try:
            outcome = self.db.write(records, touches)
        except lmdb.Error as exc:  # a full disk, an I/O error: requests go on without
            reason = "disk_full" if is_disk_full(exc, self.path) else "error"
            METRICS.storage_write_failures.labels("cache", reason).inc()
            self._failures.failed(f"{len(records)} entries dropped this time: {exc}")
            self.dropped += len(records)
            METRICS.cache_dropped_writes.inc(len(records))
            self._update_gauges()
            return
        if outcome.written:
            METRICS.cache_writes.inc(outcome.written)
        if outcome.evicted:
            self.evictions += outcome.evicted
            METRICS.cache_evictions.inc(outcome.evicted)
        if outcome.dropped:  # no room within the bound (the disk's reserve): one line a minute
            self.dropped += outcome.dropped
            METRICS.cache_dropped_writes.inc(outcome.dropped)
            METRICS.storage_write_failures.labels("cache", "no_room").inc()
            self._failures.failed(
                f"no room within the bound of {self.db.bound_bytes:,} bytes; "
                f"{outcome.dropped} entries dropped this time"
            )
        elif outcome.written:
            self._failures.recovered()
        self._update_gauges()

    def _update_gauges(self) -> None:
        s = self.db.stats()
        METRICS.cache_bytes.set(s.live_bytes)
        METRICS.cache_entries.set(s.entries)
        METRICS.cache_bound_bytes.set(s.max_bytes)
        with contextlib.suppress(OSError):
            METRICS.data_dir_free_bytes.set(free_bytes(self.path))

    def _maintain(self) -> None:
        stale = self.db.env.reader_check()
        if stale:
            log.info("cache: cleared %d reader slots of dead processes", stale)
        self._update_gauges()


def open_cache(settings: Settings) -> LmdbCache | None:
    """The server's cache from its settings; None when disabled (`--cache false`)."""
    if not settings.cache_enabled:
        return None
    reserve = reserve_bytes(settings.data_dir, settings.min_free_disk_bytes)
    return LmdbCache(
        settings.cache_dir,
        settings.cache_max_bytes,
        reserve=reserve,
        linger_s=settings.cache_commit_linger_ms / 1000,
    )


def verify_cache(path: Path) -> VerifyReport:
    """Reads every entry of the cache at `path` (read-only; safe beside a running server) and
    checks checksums and bookkeeping."""
    db = CacheDB(path, 1 << 40, readonly=True)
    try:
        return db.verify()
    finally:
        db.close()
