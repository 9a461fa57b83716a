"""Durability without a server: log entries, snapshots, recovery (snapshot + replay), and what
happens with interrupted snapshots and corrupt logs. (A real `kill -9` of a server is in
test_index_durability.py.)"""

from __future__ import annotations

import threading

import lmdb
import numpy as np
import pytest
from test_index_collection import clustered, ids_of, make_spec

from embedwarden.server import FailedPrecondition, NotFound, Settings, build_registry
from embedwarden.server.index._collection import Collection
from embedwarden.server.index._manager import IndexManager
from embedwarden.server.index._store import (
    OP_REMOVE,
    OP_UPSERT,
    CorruptLog,
    IndexStore,
    decode_entry,
    encode_entry,
)
from embedwarden.server.index._types import IndexKind, IndexParams, Metric, SearchOverrides
from embedwarden.server.models._postprocess import Pooling


def test_log_entries_round_trip_and_detect_corruption():
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = encode_entry(OP_UPSERT, 7, ["a", "ü/ß", "c"], vectors)
    entry = decode_entry(5, raw)
    assert (entry.seq, entry.op, entry.label_base, entry.ids) == (
        5,
        OP_UPSERT,
        7,
        ("a", "ü/ß", "c"),
    )
    np.testing.assert_array_equal(entry.vectors, vectors)
    removal = decode_entry(6, encode_entry(OP_REMOVE, 9, ["a"], None))
    assert removal.vectors is None and removal.ids == ("a",)
    flipped = bytearray(raw)
    flipped[40] ^= 1
    with pytest.raises(CorruptLog, match="checksum"):
        decode_entry(5, bytes(flipped))


def reopen(path, spec, store):
    store.close()
    fresh = IndexStore(path)
    return fresh, Collection.recover(spec, fresh)


def snapshot_state(collection: Collection) -> dict[str, np.ndarray]:
    return {
        i: collection.engine.reconstruct(label) for i, label in sorted(collection.label_of.items())
    }


@pytest.mark.parametrize("kind", list(IndexKind))
def test_recovery_is_the_last_snapshot_plus_the_log(tmp_path, kind):
    path = tmp_path / "index"
    store = IndexStore(path)
    params = {
        IndexKind.IVF_FLAT: {"ivf_nlist": 4, "train_min_vectors": 300},
        IndexKind.IVF_PQ: {"ivf_nlist": 4, "pq_nbits": 5, "train_min_vectors": 300},
    }.get(kind, {})
    spec = make_spec(kind, **params)
    store.put_spec(spec)
    collection = Collection.create(spec, store)
    data = clustered(700, 32, seed=11)
    collection.upsert(ids_of(400), data[:400])
    collection.remove(["v1", "v2"])
    if kind.is_ivf:
        assert collection.rebuild(threading.Event())
    assert collection.snapshot()
    snap_seq = collection.seq
    assert not collection.snapshot()  # nothing changed since
    # After the snapshot: more upserts, a replacement, removals. Only the log has them.
    collection.upsert(ids_of(700)[400:], data[400:])
    collection.upsert(["v3"], data[600:601])
    collection.remove(["v4", "v450"])
    assert [e.seq for e in store.entries_after(spec.uid, 0)] == [
        snap_seq + 1,
        snap_seq + 2,
        snap_seq + 3,
    ]  # entries up to the snapshot were trimmed
    before = snapshot_state(collection)
    labels_before = dict(collection.label_of)

    store, recovered = reopen(path, spec, store)  # no final snapshot: as after a crash
    assert recovered.seq == collection.seq and recovered.snapshot_seq == snap_seq
    assert recovered.label_of == labels_before
    assert recovered.engine.trained == collection.engine.trained
    assert recovered.info().size == 700 - 4
    after = snapshot_state(recovered)
    assert after.keys() == before.keys()
    for key, vector in before.items():
        np.testing.assert_array_equal(after[key], vector)
    for gone in ("v1", "v2", "v4", "v450"):
        with pytest.raises(NotFound):
            recovered.search(np.zeros((1, 32), np.float32), [(0, gone)], 1, SearchOverrides())
    hits = recovered.search(data[600:601].copy(), [], 700, SearchOverrides(ivf_nprobe=4)).rows()
    assert {"v1", "v2", "v4", "v450"}.isdisjoint(i for i, _ in hits[0])
    store.close()


def with_a_removal(tmp_path, kind: IndexKind, n: int, seed: int):
    """A new collection of `n` clustered vectors, "v0" removed (HNSW: a tombstone)."""
    path = tmp_path / "index"
    store = IndexStore(path)
    spec = make_spec(kind)
    collection = Collection.create(spec, store)
    data = clustered(n, 32, seed=seed)
    collection.upsert(ids_of(n), data)
    collection.remove(["v0"])
    return path, store, spec, collection, data


def test_interrupted_snapshots_are_ignored_and_cleaned(tmp_path):
    # The tombstone of "v0" must travel with the snapshot.
    path, store, spec, collection, data = with_a_removal(tmp_path, IndexKind.HNSW, 50, 12)
    assert collection.snapshot()
    collection.upsert(["late"], data[:1])
    folder = store.collection_dir(spec.uid)
    # A crash mid-snapshot leaves a renamed index without its JSON, or temporary files.
    (folder / f"snapshot-{collection.seq + 5:016d}.faiss").write_bytes(b"torn")
    (folder / f"snapshot-{collection.seq + 6:016d}.faiss.tmp").write_bytes(b"partial")
    (path / "0123456789abcdef").mkdir()  # files of a dropped collection
    store, recovered = reopen(path, spec, store)
    assert recovered.snapshot_seq == collection.snapshot_seq
    assert recovered.info().size == 50 and "late" in recovered.label_of
    assert recovered.engine.tombstones == collection.engine.tombstones
    store.remove_orphans([spec])
    assert not list(folder.glob("*.tmp")) and not (path / "0123456789abcdef").exists()
    store.close()


def test_a_kill_between_snapshot_and_trim_leaves_no_covered_entries(tmp_path, monkeypatch):
    path, store, spec, collection, _ = with_a_removal(tmp_path, IndexKind.FLAT, 30, 13)
    with monkeypatch.context() as patch:
        patch.setattr(store, "trim", lambda uid, upto: 0)  # killed right after the commit
        assert collection.snapshot()
    assert [e.seq for e in store.entries_after(spec.uid, 0)] == [1, 2]
    store, recovered = reopen(path, spec, store)
    assert recovered.snapshot_seq == 2 and recovered.info().size == 29
    assert list(store.entries_after(spec.uid, 0)) == []  # trimmed at recovery
    store.close()


def test_a_corrupt_log_makes_one_collection_unavailable_not_the_server(tmp_path):
    settings = Settings(data_dir=tmp_path, index_snapshot_interval_s=0)
    registry = build_registry()
    manager = IndexManager(settings, registry, None, None)  # vectors only: no models needed
    for name in ("good", "bad"):
        manager.create(
            name,
            "efficientnet_lite0",
            "",
            "",
            Pooling.DEFAULT,
            Metric.COSINE,
            IndexKind.FLAT,
            IndexParams(),
        )
    vectors = clustered(3, 1280, seed=13)
    for name in ("good", "bad"):
        manager._collections[name].upsert(["a", "b", "c"], vectors)
    bad_uid = manager._collections["bad"].spec.uid
    manager._stop.set()
    manager._thread.join()
    manager.store.close()  # a crash: no final snapshot

    env = lmdb.open(str(settings.index_dir / "log.lmdb"), max_dbs=4)
    log_db = env.open_db(b"log")
    with env.begin(write=True, db=log_db) as txn:
        key = bytes.fromhex(bad_uid) + (1).to_bytes(8, "big")
        raw = bytearray(txn.get(key))
        raw[100] ^= 0xFF
        txn.put(key, bytes(raw))
    env.close()

    manager = IndexManager(settings, registry, None, None)
    try:
        infos = {i.spec.name: i for i in manager.list_collections()}
        assert infos["good"].size == 3 and not infos["good"].broken
        assert "checksum" in infos["bad"].broken
        with pytest.raises(FailedPrecondition, match=r"unavailable.*checksum"):
            manager._collections["bad"].remove(["a"])
        manager.delete("bad")  # a broken collection can still be dropped
        assert [i.spec.name for i in manager.list_collections()] == ["good"]
    finally:
        manager.close()
