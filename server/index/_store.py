"""Durability of collections: a catalog and an append-only write-ahead log in LMDB, and FAISS
snapshots on disk.

Layout under `Settings.index_dir`:

    log.lmdb/                     LMDB: `catalog` (name -> spec JSON), `log` (uid|seq -> entry)
    <uid>/snapshot-<seq>.faiss    faiss.write_index of the collection's index at log seq <seq>
    <uid>/snapshot-<seq>.json     labels -> ids, next label, tombstones; written last: its
                                  presence marks the snapshot complete

Write path: every Upsert/Remove is one log entry, committed (fsync'd by LMDB) before the call is
acknowledged. A snapshot is written to a temporary file, fsync'd and renamed; then its JSON; then
the directory is fsync'd, older snapshots are deleted and log entries up to its seq are trimmed.
Recovery: the newest complete snapshot, then every log entry after its seq, in order. A crash at
any point leaves either the old snapshot plus a longer log, or the new snapshot: never less.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from ._types import CollectionSpec

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 40  # address space only: LMDB files grow as needed
_MAGIC = b"EWL1"
_HEADER = struct.Struct("<4sBQII")  # magic, op, label base, count, dimension
_ID_LEN = struct.Struct("<H")
_CRC = struct.Struct("<I")
OP_UPSERT = 1
OP_REMOVE = 2
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d{16})\.json$")


class CorruptLog(Exception):
    """A log entry failed its checksum or could not be decoded."""


@dataclass(frozen=True)
class LogEntry:
    seq: int
    op: int
    label_base: int  # first label assigned by an upsert (checked on replay)
    ids: tuple[str, ...]
    vectors: np.ndarray | None  # float32 [n, dim] for upserts, as stored (normalised if cosine)


def encode_entry(op: int, label_base: int, ids: Sequence[str], vectors: np.ndarray | None) -> bytes:
    dim = 0 if vectors is None else int(vectors.shape[1])
    parts = [_HEADER.pack(_MAGIC, op, label_base, len(ids), dim)]
    for value in ids:
        raw = value.encode("utf-8")
        parts.append(_ID_LEN.pack(len(raw)))
        parts.append(raw)
    if vectors is not None:
        parts.append(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode_entry(seq: int, raw: bytes) -> LogEntry:
    body, (crc,) = raw[: -_CRC.size], _CRC.unpack(raw[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise CorruptLog(f"log entry {seq} fails its checksum")
    magic, op, label_base, count, dim = _HEADER.unpack_from(body)
    if magic != _MAGIC or op not in (OP_UPSERT, OP_REMOVE):
        raise CorruptLog(f"log entry {seq} has an unknown format")
    offset = _HEADER.size
    ids = []
    for _ in range(count):
        (size,) = _ID_LEN.unpack_from(body, offset)
        offset += _ID_LEN.size
        ids.append(body[offset : offset + size].decode("utf-8"))
        offset += size
    vectors = None
    if op == OP_UPSERT:
        vectors = np.frombuffer(body, dtype="<f4", offset=offset).reshape(count, dim)
        vectors = vectors.astype(np.float32)  # native order, writable
    return LogEntry(seq, op, label_base, tuple(ids), vectors)


@dataclass(frozen=True)
class Snapshot:
    seq: int
    index_path: Path
    meta: dict[str, Any]


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexStore:
    """The catalog, the log and the snapshot files of every collection."""

    def __init__(self, root: Path, map_size: int = MAP_SIZE) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(root / "log.lmdb"),
            map_size=map_size,
            max_dbs=4,
            sync=True,  # every commit is fsync'd: an acknowledged write survives a crash
            metasync=True,
            readahead=False,
        )
        self._catalog = self.env.open_db(b"catalog")
        self._log = self.env.open_db(b"log")

    def close(self) -> None:
        self.env.close()

    # --- catalog -----------------------------------------------------------------------

    def specs(self) -> list[CollectionSpec]:
        with self.env.begin(db=self._catalog) as txn:
            return [CollectionSpec.from_json(bytes(v)) for _k, v in txn.cursor()]

    def put_spec(self, spec: CollectionSpec) -> None:
        """The folder first, then the catalog entry: a failure (a full disk) leaves neither."""
        folder = self.collection_dir(spec.uid)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with self.env.begin(write=True, db=self._catalog) as txn:
                txn.put(spec.name.encode(), spec.to_json())
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def drop(self, spec: CollectionSpec) -> None:
        """Deletes the spec and its log in one transaction, then its files."""
        prefix = bytes.fromhex(spec.uid)
        with self.env.begin(write=True) as txn:
            txn.delete(spec.name.encode(), db=self._catalog)
            cursor = txn.cursor(db=self._log)
            if cursor.set_range(prefix):
                while cursor.key()[: len(prefix)] == prefix:
                    if not cursor.delete():
                        break
        shutil.rmtree(self.collection_dir(spec.uid), ignore_errors=True)

    def remove_orphans(self, live: Sequence[CollectionSpec]) -> None:
        """Deletes folders of dropped collections and temporary files of interrupted writes."""
        uids = {s.uid for s in live}
        for entry in self.root.iterdir():
            if not entry.is_dir() or entry.name == "log.lmdb":
                continue
            if entry.name not in uids:
                log.info("removing files of a dropped collection: %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            for tmp in entry.glob("*.tmp"):
                tmp.unlink(missing_ok=True)

    # --- log ---------------------------------------------------------------------------

    @staticmethod
    def _key(uid: str, seq: int) -> bytes:
        return bytes.fromhex(uid) + seq.to_bytes(8, "big")

    def append(self, uid: str, seq: int, payload: bytes) -> None:
        """Commits one entry durably (LMDB fsyncs on commit) before returning."""
        with self.env.begin(write=True, db=self._log) as txn:
            if not txn.put(self._key(uid, seq), payload, overwrite=False):
                raise RuntimeError(f"log entry {seq} of collection {uid} exists already")

    def last_seq(self, uid: str) -> int:
        """The seq of the collection's last log entry (0 when its log is empty)."""
        prefix = bytes.fromhex(uid)
        upper = self._key(uid, (1 << 64) - 1)
        with self.env.begin(db=self._log) as txn:
            cursor = txn.cursor()
            if cursor.set_range(upper):
                found = cursor.key() == upper or cursor.prev()
            else:
                found = cursor.last()
            key = bytes(cursor.key()) if found else b""
        if key[: len(prefix)] != prefix:
            return 0
        return int.from_bytes(key[len(prefix) :], "big")

    def entries_after(self, uid: str, seq: int) -> Iterator[LogEntry]:
        prefix = bytes.fromhex(uid)
        with self.env.begin(db=self._log, buffers=False) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(self._key(uid, seq + 1)):
                return
            for key, value in cursor:
                if key[: len(prefix)] != prefix:
                    break
                yield decode_entry(int.from_bytes(key[len(prefix) :], "big"), value)

    def trim(self, uid: str, upto: int) -> int:
        """Deletes log entries with seq <= `upto` (covered by a durable snapshot)."""
        prefix = bytes.fromhex(uid)
        removed = 0
        with self.env.begin(write=True, db=self._log) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                while cursor.key()[: len(prefix)] == prefix:
                    if int.from_bytes(cursor.key()[len(prefix) :], "big") > upto:
                        break
                    if not cursor.delete():
                        break
                    removed += 1
        return removed

    # --- snapshots ---------------------------------------------------------------------

    def collection_dir(self, uid: str) -> Path:
        return self.root / uid

    def snapshot_tmp(self, uid: str, seq: int) -> Path:
        """Where to write the index of a new snapshot (`faiss.write_index`)."""
        folder = self.collection_dir(uid)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"snapshot-{seq:016d}.faiss.tmp"

    def commit_snapshot(self, uid: str, seq: int, tmp: Path, meta: dict[str, Any]) -> int:
        """Makes a written snapshot durable, then drops what it supersedes; returns its bytes."""
        folder = self.collection_dir(uid)
        final = folder / f"snapshot-{seq:016d}.faiss"
        _fsync_path(tmp)
        os.replace(tmp, final)
        size = final.stat().st_size
        meta = {**meta, "seq": seq, "index_file": final.name, "index_bytes": size}
        meta_path = folder / f"snapshot-{seq:016d}.json"
        meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, meta_path)
        _fsync_path(folder, directory=True)
        for older in folder.glob("snapshot-*"):
            match = re.match(r"^snapshot-(\d{16})\.", older.name)
            if match and int(match.group(1)) < seq:
                older.unlink(missing_ok=True)
        self.trim(uid, seq)
        return size

    def discard_snapshot(self, uid: str, seq: int) -> None:
        """Deletes what a failed snapshot at `seq` left (a full disk must not stay full of a
        snapshot that never completed); a complete snapshot (its JSON written) is kept."""
        folder = self.collection_dir(uid)
        stem = f"snapshot-{seq:016d}"
        for tmp in (folder / f"{stem}.faiss.tmp", folder / f"{stem}.json.tmp"):
            tmp.unlink(missing_ok=True)
        if not (folder / f"{stem}.json").exists():
            (folder / f"{stem}.faiss").unlink(missing_ok=True)

    def latest_snapshot(self, uid: str) -> Snapshot | None:
        folder = self.collection_dir(uid)
        if not folder.is_dir():
            return None
        found = sorted(
            (int(m.group(1)), p)
            for p in folder.iterdir()
            if (m := _SNAPSHOT_RE.match(p.name)) is not None
        )
        if not found:
            return None
        seq, meta_path = found[-1]
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        index_path = folder / meta["index_file"]
        if not index_path.is_file() or index_path.stat().st_size != meta["index_bytes"]:
            raise CorruptLog(f"snapshot {seq} of collection {uid}: index file missing or torn")
        return Snapshot(seq, index_path, meta)
