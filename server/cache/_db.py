"""The cache's LMDB database: reads in one transaction, group-committed writes with recency
bookkeeping, map growth, eviction, purge, statistics and an offline verify pass.

Sub-databases (all bookkeeping changes in the same transaction as the entries they describe, so
a crash at any moment leaves them consistent):

- `entries`: key -> checksummed entry (`_format`).
- `recency`: key -> u32 generation of the entry's last write or use.
- `order`: u32 generation + key -> b"", the eviction order (oldest generation first).
- `meta`: `format`, the current generation and the bytes written in it, and per model version
  `n:<prefix>` (entry count) and `fp:<prefix>` (the full fingerprint).

Recency is an approximation of LRU by generations: a generation ends after 1/32 of the size
bound has been written. A hit on an entry of an older generation moves it to the current one
(one small write, batched with the next group commit); eviction deletes the oldest generations
first. So an entry used within the last ~1/32 of the bound's worth of writes is never evicted
before one that was not, and a hot entry costs at most one bookkeeping write per generation.

Size: the bound is `max_bytes`, or less when the filesystem is filling: with a reserve, the
bound is what keeps `reserve_bytes` free on the data dir's filesystem (the file's own blocks
plus the free space, minus the reserve), recomputed before every commit. The map starts at
64 MiB (or the existing file) and doubles on demand up to the bound; when the bound falls below
the map (the disk filled from other causes) the map shrinks to the bound or to the file,
whichever is larger, so the file cannot grow again. Live pages are kept below 85% of the bound
by evicting down to 70% before a commit would cross it; if LMDB still reports the map or the
disk full, the writer evicts more and retries. Only the writer sees these errors; requests
never do.

Several processes may open one directory: LMDB serialises writers with a robust mutex in
`lock.mdb` and readers never block; a process that grew the map is followed by the others
(MDB_MAP_RESIZED is handled). Within one process a directory can be opened once (LMDB's
rule); a second open raises a clear error.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from .._errors import FailedPrecondition
from .._storage import free_bytes, is_disk_full
from ._format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    PREFIX_BYTES,
    CorruptEntry,
    decode_entry,
    fingerprint_prefix,
)

log = logging.getLogger(__name__)

MIB = 1 << 20
INITIAL_MAP_BYTES = 64 * MIB
MIN_MAX_BYTES = 1 * MIB
HIGH_WATER = 0.85
LOW_WATER = 0.70
GENERATIONS = 32
PURGE_CHUNK = 2048
EVICT_CHUNK = 32

_GEN = struct.Struct(">I")  # big-endian: `order` sorts by generation
_U64 = struct.Struct("<Q")
_FP = slice(20, 52)  # the fingerprint inside an entry's header

_open_paths: set[str] = set()
_open_lock = threading.Lock()


@dataclass
class WriteOutcome:
    written: int = 0
    evicted: int = 0
    dropped: int = 0


@dataclass
class DBStats:
    entries: int
    live_bytes: int
    map_bytes: int
    max_bytes: int
    versions: list[tuple[str, int]]  # (fingerprint, entries)


@dataclass
class VerifyReport:
    entries: int = 0
    ok: int = 0
    corrupt: list[str] = field(default_factory=list)  # hex keys and why
    problems: list[str] = field(default_factory=list)  # bookkeeping inconsistencies

    @property
    def passed(self) -> bool:
        return not self.corrupt and not self.problems


class _TxnGate:
    """Transactions of this process share the gate; changing the map size takes it alone
    (LMDB requires that the process has no active transaction then)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._waiting = 0

    def acquire(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._active += 1

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0 and self._waiting:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._active:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class CacheDB:
    """One LMDB environment holding the cache. Reads may come from any thread; writes should
    come from one thread (the group-commit writer) so that they batch."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        readonly: bool = False,
        sync: bool = True,
        reserve_bytes: int | None = None,
    ) -> None:
        """`reserve_bytes`: free space to leave on the filesystem (None: `max_bytes` only)."""
        self.path = path
        self.max_bytes = max(int(max_bytes), MIN_MAX_BYTES)
        self.reserve_bytes = reserve_bytes
        self.bound_bytes = self.max_bytes  # the effective bound at the last commit
        self.readonly = readonly
        self._gate = _TxnGate()
        self._gen_limit = self.max_bytes // GENERATIONS
        self._real = str(path.resolve())
        with _open_lock:
            if self._real in _open_paths:
                raise FailedPrecondition(
                    f"the cache at {path} is already open in this process (LMDB allows one "
                    "environment per directory and process); give each server its own "
                    "--data-dir, or run them as separate processes"
                )
            _open_paths.add(self._real)
        try:
            self.env = self._open()
        except BaseException:
            with _open_lock:
                _open_paths.discard(self._real)
            raise

    def _open(self) -> lmdb.Environment:
        data = self.path / "data.mdb"
        if self.readonly and not data.exists():
            raise FailedPrecondition(f"no cache database at {self.path}")
        used = data.stat().st_size if data.exists() else 0
        if used > self.max_bytes and not self.readonly:
            log.warning(
                "cache file %s is %d bytes, above the bound of %d: eviction keeps live data "
                "under the bound, but an LMDB file never shrinks (delete the cache directory "
                "to reclaim the space)",
                data,
                used,
                self.max_bytes,
            )
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            self.bound_bytes = self.bound()
        initial = min(self.bound_bytes, INITIAL_MAP_BYTES)
        try:
            env = lmdb.open(
                str(self.path),
                map_size=_pages(max(initial, used, MIN_MAX_BYTES)),
                max_dbs=8,
                max_readers=1024,
                readonly=self.readonly,
                sync=True,
                metasync=True,
                readahead=False,
                meminit=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise FailedPrecondition(f"cannot open the cache at {self.path}: {exc}") from exc
        stale = env.reader_check()  # reader slots of processes that died (kill -9)
        if stale:
            log.info("cache: cleared %d stale reader slots", stale)
        create = not self.readonly
        try:
            self._entries = env.open_db(b"entries", create=create)
            self._recency = env.open_db(b"recency", create=create)
            self._order = env.open_db(b"order", create=create)
            self._meta = env.open_db(b"meta", create=create)
        except lmdb.NotFoundError as exc:
            env.close()
            raise FailedPrecondition(f"{self.path} is not an embedwarden cache") from exc
        if not self.readonly:
            self._check_format(env)
        return env

    def _check_format(self, env: lmdb.Environment) -> None:
        wanted = str(FORMAT_VERSION).encode()
        with env.begin(write=True) as txn:
            found = txn.get(b"format", None, self._meta)
            if found == wanted:
                return
            if found is not None or txn.stat(self._entries)["entries"]:
                log.warning("cache format %r is not %r: clearing the cache", found, wanted)
                for db in (self._entries, self._recency, self._order, self._meta):
                    txn.drop(db, delete=False)
            txn.put(b"format", wanted, db=self._meta)
            txn.put(b"gen", _GEN.pack(0), db=self._meta)

    def close(self) -> None:
        with self._gate.exclusive():
            self.env.close()
        with _open_lock:
            _open_paths.discard(self._real)

    # --- transactions ----------------------------------------------------------------------

    @contextmanager
    def _txn(self, write: bool = False) -> Iterator[Any]:
        """A transaction under the shared gate; follows a map grown by another process."""
        while True:
            self._gate.acquire()
            try:
                txn = self.env.begin(write=write)
                break
            except lmdb.MapResizedError:
                self._gate.release()
                self._adopt_map_size()
            except BaseException:
                self._gate.release()
                raise
        try:
            yield txn
            if write:
                txn.commit()
            else:
                txn.abort()
        except BaseException:
            txn.abort()
            raise
        finally:
            self._gate.release()

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self.env.set_mapsize(0)  # 0: the size recorded by the process that grew it
        log.info("cache: map size followed another process to %d", self.map_bytes)

    @property
    def map_bytes(self) -> int:
        return int(self.env.info()["map_size"])

    def file_bytes(self) -> int:
        """Disk blocks the database file holds now."""
        try:
            return int((self.path / "data.mdb").stat().st_blocks) * 512
        except OSError:
            return 0

    def bound(self) -> int:
        """The effective size bound now: `max_bytes`, or less so that the reserve stays free
        on the filesystem (0 when even the file as it is eats into the reserve)."""
        if self.reserve_bytes is None:
            return self.max_bytes
        try:
            room = self.file_bytes() + free_bytes(self.path) - self.reserve_bytes
        except OSError:
            return self.max_bytes
        return max(0, min(self.max_bytes, room))

    def _grow(self) -> bool:
        """Doubles the map, up to the bound; False when it is there already."""
        current = self.map_bytes
        if current >= self.bound_bytes:
            return False
        # At least the initial size: a map shrunk to a tiny file on a full disk regrows at once.
        new = _pages(min(self.bound_bytes, max(current * 2, INITIAL_MAP_BYTES)))
        if new <= current:
            return False
        with self._gate.exclusive():
            self.env.set_mapsize(new)
        log.info("cache: map grown from %d to %d bytes", current, new)
        return True

    def _fit_map(self) -> None:
        """Shrinks the map to the bound (never below the file): the file cannot grow past it."""
        current = self.map_bytes
        new = _pages(max(self.bound_bytes, (self.path / "data.mdb").stat().st_size))
        if new < current:
            with self._gate.exclusive():
                self.env.set_mapsize(new)
            log.info("cache: map shrunk from %d to %d bytes (disk filling)", current, new)

    def _live_bytes(self, txn: Any) -> int:
        pages = 0
        psize = 4096
        for db in (self._entries, self._recency, self._order, self._meta):
            s = txn.stat(db)
            psize = s["psize"]
            pages += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        return pages * psize

    # --- reads -------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> tuple[list[bytes | None], list[bytes]]:
        """Values (None where absent) read in one transaction, and the keys found whose
        recency generation is not the current one (candidates for a touch)."""
        entries, recency = self._entries, self._recency
        gate = self._gate
        while True:  # the hot path: no context managers
            gate.acquire()
            try:
                txn = self.env.begin()
            except lmdb.MapResizedError:
                gate.release()
                self._adopt_map_size()
                continue
            except BaseException:
                gate.release()
                raise
            try:
                get = txn.get
                values = [get(k, None, entries) for k in keys]
                current = get(b"gen", None, self._meta)
                stale = [
                    k
                    for k, v in zip(keys, values, strict=True)
                    if v is not None and get(k, None, recency) != current
                ]
                return values, stale
            finally:
                txn.abort()
                gate.release()

    # --- writes ------------------------------------------------------------------------------

    def write(
        self, records: Sequence[tuple[bytes, bytes]], touches: Sequence[bytes]
    ) -> WriteOutcome:
        """Commits `records` (key, entry) and moves `touches` to the current generation, in one
        transaction, evicting and growing the map as needed. Never raises MapFullError."""
        outcome = WriteOutcome()
        incoming = sum(_footprint(len(v)) for _, v in records)
        self._set_bound()
        bound = self.bound_bytes
        if incoming > HIGH_WATER * bound:  # would not fit even in an empty cache: no room
            outcome.dropped = len(records)
            return outcome
        with self._txn() as txn:
            live = self._live_bytes(txn)
        if live + incoming > HIGH_WATER * bound:
            target = int(LOW_WATER * bound) - incoming
            outcome.evicted += self.evict(max(target, 0))
        squeeze = LOW_WATER
        for _attempt in range(6):
            try:
                with self._txn(write=True) as txn:
                    self._put(txn, records, touches)
                outcome.written = len(records)
                return outcome
            except lmdb.MapFullError:
                if self._grow():
                    continue
            except lmdb.Error as exc:  # the disk filled from other causes since the bound
                if not is_disk_full(exc, self.path):
                    raise
                self._set_bound()
            squeeze -= 0.15
            outcome.evicted += self.evict(int(max(squeeze, 0.0) * self.bound_bytes))
        log.debug("cache: could not make room for %d entries; dropped", len(records))
        outcome.dropped = len(records)
        return outcome

    def _set_bound(self) -> None:
        self.bound_bytes = self.bound()
        self._gen_limit = max(self.bound_bytes // GENERATIONS, 1)
        self._fit_map()

    def _put(
        self, txn: Any, records: Sequence[tuple[bytes, bytes]], touches: Sequence[bytes]
    ) -> None:
        meta, recency, order, entries = self._meta, self._recency, self._order, self._entries
        current = txn.get(b"gen", None, meta) or _GEN.pack(0)
        gen_bytes = _U64.unpack(txn.get(b"gen_bytes", None, meta) or _U64.pack(0))[0]
        new: Counter[bytes] = Counter()
        fingerprints: dict[bytes, bytes] = {}
        for key, value in records:
            old = txn.get(key, None, recency)
            if old is None:
                new[key[:PREFIX_BYTES]] += 1
                fingerprints[key[:PREFIX_BYTES]] = value[_FP]
            elif old != current:
                txn.delete(old + key, db=order)
            if old != current:
                txn.put(key, current, db=recency)
                txn.put(current + key, b"", db=order)
            txn.put(key, value, db=entries)
            gen_bytes += len(value)
        for key in touches:
            old = txn.get(key, None, recency)
            if old is None or old == current:
                continue  # evicted or purged meanwhile, or already current
            txn.delete(old + key, db=order)
            txn.put(key, current, db=recency)
            txn.put(current + key, b"", db=order)
        for prefix, n in new.items():
            _add_count(txn, meta, prefix, n)
            txn.put(b"fp:" + prefix, fingerprints[prefix], db=meta)
        if gen_bytes >= self._gen_limit:
            current = _GEN.pack(_GEN.unpack(current)[0] + 1)
            gen_bytes = 0
        txn.put(b"gen", current, db=meta)
        txn.put(b"gen_bytes", _U64.pack(gen_bytes), db=meta)

    def evict(self, target_bytes: int) -> int:
        """Deletes the oldest-generation entries until live data is at most `target_bytes`."""
        evicted = 0
        with self._txn(write=True) as txn:
            cursor = txn.cursor(self._order)
            removed: Counter[bytes] = Counter()
            while (excess := self._live_bytes(txn) - target_bytes) > 0 and cursor.first():
                freed = 0  # a chunk stops early at large entries (maps of 1.6 MB each)
                for _ in range(EVICT_CHUNK):
                    record = cursor.key()
                    if not record or freed >= excess:
                        break
                    key = record[4:]
                    value = txn.get(key, None, self._entries)
                    freed += _footprint(len(value)) if value is not None else 0
                    txn.delete(key, db=self._entries)
                    txn.delete(key, db=self._recency)
                    cursor.delete()
                    removed[key[:PREFIX_BYTES]] += 1
                    evicted += 1
            for prefix, n in removed.items():
                _add_count(txn, self._meta, prefix, -n)
        if evicted:
            # LMDB hands out the pages a transaction freed only two transactions later (the
            # previous snapshot must survive a crash); one more small commit makes them
            # reusable by the next write. It also counts evictions across processes.
            with self._txn(write=True) as txn:
                total = _U64.unpack(txn.get(b"evictions", None, self._meta) or _U64.pack(0))[0]
                txn.put(b"evictions", _U64.pack(total + evicted), db=self._meta)
            log.debug("cache: evicted %d entries", evicted)
        return evicted

    def purge(self, fingerprint: str | None) -> int:
        """Deletes every entry (None) or one model version's entries; returns how many."""
        if fingerprint is None:
            with self._txn(write=True) as txn:
                removed = int(txn.stat(self._entries)["entries"])
                for db in (self._entries, self._recency, self._order):
                    txn.drop(db, delete=False)
                cursor = txn.cursor(self._meta)
                for prefix in (b"n:", b"fp:"):
                    while cursor.set_range(prefix) and cursor.key().startswith(prefix):
                        cursor.delete()
            return removed
        prefix = fingerprint_prefix(fingerprint)
        raw = bytes.fromhex(fingerprint)
        removed = 0
        start = prefix
        while True:
            with self._txn(write=True) as txn:
                n, start = self._purge_chunk(txn, prefix, raw, start)
                _add_count(txn, self._meta, prefix, -n)
            removed += n
            if n < PURGE_CHUNK:
                return removed

    def _purge_chunk(self, txn: Any, prefix: bytes, raw: bytes, start: bytes) -> tuple[int, bytes]:
        cursor = txn.cursor(self._entries)
        n = 0
        found = cursor.set_range(start)
        while found and n < PURGE_CHUNK:
            key = cursor.key()
            if not key.startswith(prefix):
                break
            value = cursor.value()
            if value[_FP] != raw and _valid(key, value):
                found = cursor.next()  # another version sharing the 8-byte prefix
                continue
            gen = txn.get(key, None, self._recency)
            if gen is not None:
                txn.delete(gen + key, db=self._order)
                txn.delete(key, db=self._recency)
            found = cursor.delete() and bool(cursor.key())
            n += 1
        return n, cursor.key() if found else prefix

    # --- statistics and verification ---------------------------------------------------------

    def stats(self) -> DBStats:
        with self._txn() as txn:
            entries = int(txn.stat(self._entries)["entries"])
            live = self._live_bytes(txn)
            versions = []
            cursor = txn.cursor(self._meta)
            found = cursor.set_range(b"n:")
            while found and cursor.key().startswith(b"n:"):
                prefix = cursor.key()[2:]
                count = _U64.unpack(cursor.value())[0]
                fp = txn.get(b"fp:" + prefix, b"", self._meta)
                if count:
                    versions.append((fp.hex(), int(count)))
                found = cursor.next()
        return DBStats(entries, live, self.map_bytes, self.bound_bytes, versions)

    def verify(self, max_reported: int = 50) -> VerifyReport:
        """Reads every entry and checks its checksum, and that the bookkeeping agrees."""
        report = VerifyReport()
        with self._txn() as txn:
            counts: Counter[bytes] = Counter()
            for key, value in txn.cursor(self._entries):
                report.entries += 1
                counts[key[:PREFIX_BYTES]] += 1
                try:
                    decode_entry(key, value)
                    report.ok += 1
                except CorruptEntry as exc:
                    if len(report.corrupt) < max_reported:
                        report.corrupt.append(f"{key.hex()}: {exc}")
                gen = txn.get(key, None, self._recency)
                if gen is None or txn.get(gen + key, None, self._order) is None:
                    report.problems.append(f"{key.hex()}: no recency record")
            for what, db in (("recency", self._recency), ("order", self._order)):
                n = int(txn.stat(db)["entries"])
                if n != report.entries:
                    report.problems.append(f"{n} {what} records for {report.entries} entries")
            cursor = txn.cursor(self._meta)
            found = cursor.set_range(b"n:")
            while found and cursor.key().startswith(b"n:"):
                prefix = cursor.key()[2:]
                stored = _U64.unpack(cursor.value())[0]
                actual = counts.pop(prefix, 0)
                if stored != actual:
                    report.problems.append(f"{prefix.hex()}: count {stored}, entries {actual}")
                found = cursor.next()
            report.problems.extend(f"no count for {p.hex()}" for p in counts)
        del report.problems[max_reported:]
        return report


def _add_count(txn: Any, meta: Any, prefix: bytes, delta: int) -> None:
    name = b"n:" + prefix
    count = _U64.unpack(txn.get(name, None, meta) or _U64.pack(0))[0] + delta
    if count > 0:
        txn.put(name, _U64.pack(count), db=meta)
    else:
        txn.delete(name, db=meta)
        txn.delete(b"fp:" + prefix, db=meta)


def _valid(key: bytes, value: bytes) -> bool:
    try:
        decode_entry(key, value)
        return True
    except CorruptEntry:
        return False


def _pages(size: int, psize: int = 4096) -> int:
    """`size` rounded up to whole pages (LMDB maps whole pages)."""
    return -(-size // psize) * psize


def _footprint(size: int, psize: int = 4096) -> int:
    """Approximate bytes an entry of `size` bytes takes, bookkeeping included."""
    if size > psize // 2 - 64:  # LMDB overflow pages: whole pages, 16-byte header
        return -(-(size + 16) // psize) * psize + 200
    return size + 40 + 200 + HEADER_BYTES
