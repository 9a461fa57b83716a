"""FAISS indexes per kind behind one small interface (`Engine`).

FAISS ids are *labels*: int64 values the collection assigns in increasing order, one per stored
vector (a replaced vector gets a new label). Two things can hide labels from searches:

- `hidden_from`: while a batch is added in chunks (so that searches can run between chunks),
  its labels, all >= `hidden_from`, stay invisible until the batch commits.
- tombstones (HNSW only): FAISS's HNSW cannot delete, so a removed label stays in the graph,
  where it still routes searches but is never returned. Once tombstones exceed
  `HNSW_REBUILD_FRACTION` of the graph, the collection rebuilds the graph in the background.

Both are enforced with an `IDSelector` passed per search, built once per change.

IVF kinds start as an exact flat index and are replaced by a trained IVF index, built in the
background, once `train_min_vectors` vectors exist (`build_replacement`).

Callers hold the collection's locks: mutations exclusively, searches shared.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ._types import CollectionSpec, IndexKind, Metric, SearchOverrides


def _import_faiss() -> ModuleType:
    """Imports FAISS with its OpenMP threads sleeping, not spinning, between parallel regions.

    FAISS bundles its own libgomp, which reads OMP_WAIT_POLICY once, when it loads. Searches
    arrive on several server threads, each with its own OpenMP team; with the default policy
    the idle teams spin and starve the busy one (measured on 2 cores: this repository's
    collection tests took 33 s instead of 6 s). The variable is set only while FAISS loads (so
    torch's own libgomp keeps its default) and never over an explicit setting.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    ours = "OMP_WAIT_POLICY" not in os.environ
    if ours:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss as module
    finally:
        if ours:
            os.environ.pop("OMP_WAIT_POLICY", None)
    return module


# FAISS's bundled type stubs cover only part of its SWIG API (no SearchParametersHNSW,
# DirectMap, `.this`); treat it as untyped rather than sprinkling ignores.
faiss: Any = _import_faiss()
# Exhaustive distances go through BLAS from this many queries at once (FAISS's long-standing
# default; this wheel ships 128000, i.e. never). Measured on 2 cores: 64 queries over 50k x 1280
# flat 0.2 s instead of 1.6 s, IVF-PQ training (k-means per sub-quantizer) 13 s instead of 122 s.
BLAS_THRESHOLD = 20
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

HNSW_REBUILD_FRACTION = 0.2
HNSW_REBUILD_MIN = 64  # tombstones before a rebuild is worth it at all
TRAIN_POINTS_PER_CENTROID = 64  # training sample: at most this many vectors per IVF list
BUILD_CHUNK = 4096  # vectors added per step while building a replacement (cancellable)


class Cancelled(Exception):
    """A background build was cancelled (collection deleted, server stopping)."""


def faiss_metric(metric: Metric) -> int:
    return int(faiss.METRIC_L2 if metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT)


def _labels(values: Iterable[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64)


class Engine:
    """One FAISS index of a collection. Subclasses differ in how they remove and rebuild."""

    add_chunk = 1 << 30  # vectors added per exclusive-lock section; HNSW adds are slow

    def __init__(self, spec: CollectionSpec, index: Any, tombstones: Iterable[int] = ()) -> None:
        self.spec = spec
        self.index = index
        self.tombstones: set[int] = set(tombstones)
        self.hidden_from: int | None = None
        self._selector: tuple[Any, ...] = ()  # (selector, objects it references)
        self.refresh_visibility()

    # --- state -------------------------------------------------------------------------

    @property
    def trained(self) -> bool:
        return True

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def live(self) -> int:
        return self.ntotal - len(self.tombstones)

    def nbytes(self) -> int:
        """Approximate serialized size: stored vectors plus 8-byte labels (+ kind extras)."""
        return self.ntotal * (self.spec.dimension * 4 + 8)

    def refresh_visibility(self) -> None:
        """Rebuilds the search-time selector after `hidden_from` or the tombstones changed."""
        parts: list[Any] = []
        refs: list[Any] = []
        if self.hidden_from is not None:
            parts.append(faiss.IDSelectorRange(0, self.hidden_from))
        if self.tombstones:
            batch = faiss.IDSelectorBatch(_labels(sorted(self.tombstones)))
            refs.append(batch)
            parts.append(faiss.IDSelectorNot(batch))
        if not parts:
            self._selector = ()
            return
        selector = parts[0]
        for part in parts[1:]:
            refs.append(selector)
            selector = faiss.IDSelectorAnd(selector, part)
        self._selector = (selector, *parts, *refs)

    # --- mutations (exclusive lock held) -----------------------------------------------

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, labels)

    def remove(self, labels: Iterable[int]) -> None:
        array = _labels(labels)
        if len(array):
            self.index.remove_ids(array)

    # --- reads (shared lock held) ------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, overrides: SearchOverrides
    ) -> tuple[np.ndarray, np.ndarray]:
        bundle = self._selector  # one read: a consistent selector for this whole search
        params = self._params(overrides, bundle[0] if bundle else None)
        distances, labels = self.index.search(queries, k, params=params)
        return distances, labels

    def _params(self, overrides: SearchOverrides, selector: Any) -> Any:
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def reconstruct(self, label: int) -> np.ndarray:
        return np.asarray(self.index.reconstruct(int(label)), dtype=np.float32)

    def export_live(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of every visible vector, in insertion order."""
        labels = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = self.index.index.reconstruct_n(0, self.ntotal)
        keep = np.ones(len(labels), dtype=bool)
        if self.tombstones:
            keep &= ~np.isin(labels, _labels(self.tombstones))
        if self.hidden_from is not None:
            keep &= labels < self.hidden_from
        return labels[keep], vectors[keep]

    # --- background rebuilds -------------------------------------------------------------

    def wants_rebuild(self) -> bool:
        return False

    def build_replacement(
        self, labels: np.ndarray, vectors: np.ndarray, cancel: threading.Event
    ) -> Engine:
        raise NotImplementedError


class FlatEngine(Engine):
    """Exact search (`IndexIDMap2` over `IndexFlat`); removal is native."""


class HNSWEngine(Engine):
    """`IndexIDMap2` over `IndexHNSWFlat`; removal by tombstones, compaction by rebuild."""

    add_chunk = 256

    def nbytes(self) -> int:
        hnsw = faiss.downcast_index(self.index.index).hnsw
        graph = int(hnsw.neighbors.size()) * 4 + self.ntotal * 4 + (self.ntotal + 1) * 8
        return super().nbytes() + graph

    def remove(self, labels: Iterable[int]) -> None:
        self.tombstones.update(int(v) for v in labels)
        self.refresh_visibility()

    def _params(self, overrides: SearchOverrides, selector: Any) -> Any:
        params = faiss.SearchParametersHNSW()
        params.efSearch = overrides.hnsw_ef_search or self.spec.params.hnsw_ef_search
        if selector is not None:
            params.sel = selector
        return params

    def wants_rebuild(self) -> bool:
        dead = len(self.tombstones)
        return dead >= HNSW_REBUILD_MIN and dead >= HNSW_REBUILD_FRACTION * self.ntotal

    def build_replacement(
        self, labels: np.ndarray, vectors: np.ndarray, cancel: threading.Event
    ) -> Engine:
        engine = HNSWEngine(self.spec, new_index(self.spec))
        _add_in_chunks(engine, labels, vectors, cancel)
        return engine


class IVFEngine(Engine):
    """IVF-flat or IVF-PQ. Until trained, an exact flat index stands in (`trained` False)."""

    add_chunk = 16_384

    @property
    def trained(self) -> bool:
        return isinstance(self.index, faiss.IndexIVF)

    def nbytes(self) -> int:
        if not self.trained:
            return super().nbytes()
        quantizer = self.spec.params.ivf_nlist * self.spec.dimension * 4
        return self.ntotal * (int(self.index.code_size) + 8 + 16) + quantizer  # 16: id hash

    def _params(self, overrides: SearchOverrides, selector: Any) -> Any:
        if not self.trained:
            return super()._params(overrides, selector)
        params = faiss.SearchParametersIVF()
        params.nprobe = overrides.ivf_nprobe or self.spec.params.ivf_nprobe
        if selector is not None:
            params.sel = selector
        return params

    def export_live(self) -> tuple[np.ndarray, np.ndarray]:
        if self.trained:
            raise RuntimeError("a trained IVF index is never rebuilt")
        return super().export_live()

    def wants_rebuild(self) -> bool:
        return not self.trained and self.live >= self.spec.params.train_min_vectors

    def build_replacement(
        self, labels: np.ndarray, vectors: np.ndarray, cancel: threading.Event
    ) -> Engine:
        p = self.spec.params
        limit = max(p.train_min_vectors, TRAIN_POINTS_PER_CENTROID * p.ivf_nlist)
        sample = vectors
        if len(vectors) > limit:
            rows = np.random.default_rng(0).choice(len(vectors), limit, replace=False)
            sample = vectors[np.sort(rows)]
        index = trained_ivf(self.spec, sample)
        if cancel.is_set():
            raise Cancelled
        engine = IVFEngine(self.spec, index)
        _add_in_chunks(engine, labels, vectors, cancel)
        return engine


def _add_in_chunks(
    engine: Engine, labels: np.ndarray, vectors: np.ndarray, cancel: threading.Event
) -> None:
    for start in range(0, len(labels), BUILD_CHUNK):
        if cancel.is_set():
            raise Cancelled
        engine.add(labels[start : start + BUILD_CHUNK], vectors[start : start + BUILD_CHUNK])


def trained_ivf(spec: CollectionSpec, sample: np.ndarray) -> Any:
    """A trained, empty IVF index for `spec` (k-means over `sample`), with an id hashtable so
    that vectors can be removed and reconstructed by label."""
    p = spec.params
    metric = faiss_metric(spec.metric)
    quantizer = faiss.IndexFlat(spec.dimension, metric)
    index: Any
    if spec.kind is IndexKind.IVF_PQ:
        index = faiss.IndexIVFPQ(quantizer, spec.dimension, p.ivf_nlist, p.pq_m, p.pq_nbits, metric)
    else:
        index = faiss.IndexIVFFlat(quantizer, spec.dimension, p.ivf_nlist, metric)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index frees it (and writes it with itself)
    index.cp.seed = 1234
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def new_index(spec: CollectionSpec) -> Any:
    """An empty index for `spec` (IVF kinds: the exact stand-in used until training)."""
    metric = faiss_metric(spec.metric)
    if spec.kind is IndexKind.HNSW:
        inner = faiss.IndexHNSWFlat(spec.dimension, spec.params.hnsw_m, metric)
        inner.hnsw.efConstruction = spec.params.hnsw_ef_construction
        inner.hnsw.efSearch = spec.params.hnsw_ef_search
    else:
        inner = faiss.IndexFlat(spec.dimension, metric)
    index = faiss.IndexIDMap2(inner)
    index.own_fields = True
    inner.this.disown()
    return index


def write_index(index: Any, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path) -> Any:
    return faiss.read_index(str(path))


_ENGINES: dict[IndexKind, type[Engine]] = {
    IndexKind.FLAT: FlatEngine,
    IndexKind.HNSW: HNSWEngine,
    IndexKind.IVF_FLAT: IVFEngine,
    IndexKind.IVF_PQ: IVFEngine,
}


def new_engine(spec: CollectionSpec) -> Engine:
    return _ENGINES[spec.kind](spec, new_index(spec))


def engine_from_index(spec: CollectionSpec, index: Any, tombstones: Iterable[int]) -> Engine:
    """Wraps an index read from a snapshot; checks that it matches the collection's spec."""
    if int(index.d) != spec.dimension:
        raise ValueError(f"snapshot index has dimension {index.d}, expected {spec.dimension}")
    if int(index.metric_type) != faiss_metric(spec.metric):
        raise ValueError("snapshot index has another metric than its collection")
    return _ENGINES[spec.kind](spec, index, tombstones)
