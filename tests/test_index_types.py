"""Index parameters, names and ids: defaults, bounds and the messages users see."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_index_collection import clustered, ids_of, make_spec

from embedwarden.server import InvalidInput, LimitExceeded
from embedwarden.server.index._collection import Collection
from embedwarden.server.index._faiss import faiss
from embedwarden.server.index._store import IndexStore
from embedwarden.server.index._types import (
    IndexKind,
    IndexParams,
    check_id,
    check_ids,
    check_k,
    check_name,
    default_pq_m,
    normalize_rows,
    resolve_params,
)


def test_defaults_for_the_default_models_1280_dimensions():
    hnsw = resolve_params(IndexKind.HNSW, IndexParams(), 1280)
    assert (hnsw.hnsw_m, hnsw.hnsw_ef_construction, hnsw.hnsw_ef_search) == (32, 80, 64)
    assert hnsw.ivf_nlist == 0 and hnsw.pq_m == 0  # nothing of other kinds is stored
    pq = resolve_params(IndexKind.IVF_PQ, IndexParams(), 1280)
    assert (pq.ivf_nlist, pq.ivf_nprobe, pq.pq_m, pq.pq_nbits) == (256, 16, 320, 8)
    assert pq.train_min_vectors == 39 * 256
    assert resolve_params(IndexKind.FLAT, IndexParams(), 1280) == IndexParams()
    assert (default_pq_m(1000), default_pq_m(7), default_pq_m(64)) == (250, 1, 16)


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        (IndexKind.FLAT, {"ivf_nlist": 4}, "do not apply to a flat"),
        (IndexKind.HNSW, {"hnsw_m": 2}, r"hnsw_m 2 is out of range \[4, 128\]"),
        (IndexKind.IVF_FLAT, {"ivf_nlist": 8, "ivf_nprobe": 9}, "exceeds ivf_nlist"),
        (IndexKind.IVF_FLAT, {"ivf_nlist": 100, "train_min_vectors": 99}, "below 100"),
        (IndexKind.IVF_PQ, {"pq_nbits": 8, "train_min_vectors": 200}, "below 256"),
        (IndexKind.IVF_PQ, {"pq_m": 3}, "must divide the dimension 1280"),
    ],
)
def test_bad_parameters_say_what_is_wrong(kind, params, message):
    with pytest.raises(InvalidInput, match=message):
        resolve_params(kind, IndexParams(**params), 1280)


def test_names_ids_and_k():
    assert check_name("photos_2026-11.v1") == "photos_2026-11.v1"
    for bad in ("", "-x", "a/b", "a b", "x" * 65, "ü"):
        with pytest.raises(InvalidInput, match="collection name"):
            check_name(bad)
    assert check_id("photos/2026/cat 1.jpg", "ids[0]")
    with pytest.raises(LimitExceeded, match="limit is 512"):
        check_id("é" * 257, "ids[0]")  # 514 bytes of UTF-8
    with pytest.raises(LimitExceeded, match="limit is 10000"):
        check_ids(ids_of(10_001), "ids", unique=False)
    assert check_ids(["a", "a"], "ids", unique=False) == ["a", "a"]
    assert (check_k(0), check_k(1000)) == (10, 1000)
    with pytest.raises(LimitExceeded):
        check_k(1001)
    rows = normalize_rows(np.array([[3.0, 4.0]], np.float32), "items")
    np.testing.assert_allclose(rows, [[0.6, 0.8]])


@pytest.mark.parametrize("kind", list(IndexKind))
def test_reported_bytes_are_close_to_the_serialized_index(tmp_path, kind):
    store = IndexStore(tmp_path)
    params = {
        IndexKind.IVF_FLAT: {"ivf_nlist": 8, "train_min_vectors": 400},
        IndexKind.IVF_PQ: {"ivf_nlist": 8, "pq_nbits": 6, "train_min_vectors": 400},
    }.get(kind, {})
    collection = Collection.create(make_spec(kind, dim=64, **params), store)
    collection.upsert(ids_of(2000), clustered(2000, 64, seed=3))
    if kind.is_ivf:
        assert collection.rebuild(threading.Event())
    actual = faiss.serialize_index(collection.engine.index).size
    assert collection.info().index_bytes == pytest.approx(actual, rel=0.25)
    store.close()
