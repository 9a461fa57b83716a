"""Client methods for similarity search (IndexService).

A collection is bound to one model version: vectors you upsert or search with must carry the
fingerprint of the version that made them (`Extraction.model.fingerprint`), or send images and
let the server embed them with the collection's model. Each `upsert`/`remove` call is one
request: atomic, and durable once it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import accumulate
from typing import Any, NamedTuple

import numpy as np

from embedwarden.v1 import index_pb2, types_pb2

from ._base import ClientBase
from ._types import (
    CACHE_MODES,
    POOLINGS,
    ImageLike,
    ModelIdentity,
    Text,
    image_input,
    model_ref,
)
from .tensor import encode, field_number, tensor_field, to_array, to_tensor

_INDEX_SERVICE = index_pb2.DESCRIPTOR.services_by_name["IndexService"]
METRICS = {
    "cosine": index_pb2.METRIC_COSINE,
    "ip": index_pb2.METRIC_INNER_PRODUCT,
    "l2": index_pb2.METRIC_L2,
}
KINDS = {
    "flat": index_pb2.INDEX_KIND_FLAT,
    "hnsw": index_pb2.INDEX_KIND_HNSW,
    "ivf": index_pb2.INDEX_KIND_IVF_FLAT,
    "ivf_flat": index_pb2.INDEX_KIND_IVF_FLAT,
    "ivf_pq": index_pb2.INDEX_KIND_IVF_PQ,
}
_KIND_NAMES = {
    index_pb2.INDEX_KIND_FLAT: "flat",
    index_pb2.INDEX_KIND_HNSW: "hnsw",
    index_pb2.INDEX_KIND_IVF_FLAT: "ivf_flat",
    index_pb2.INDEX_KIND_IVF_PQ: "ivf_pq",
}
_METRIC_NAMES = {v: k for k, v in METRICS.items()}
PARAM_NAMES = tuple(f.name for f in index_pb2.IndexParams.DESCRIPTOR.fields)


def _choice(table: dict[str, Any], value: str, what: str) -> Any:
    key = value.strip().lower().replace("-", "_")
    if key not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {value!r}")
    return table[key]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model: ModelIdentity
    layer: str
    pooling: str
    metric: str  # cosine | ip | l2
    kind: str  # flat | hnsw | ivf_flat | ivf_pq
    params: dict[str, int]
    dimension: int
    size: int
    index_bytes: int
    trained: bool  # IVF kinds: False while still searching exactly
    created_at: float
    log_sequence: int

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @classmethod
    def from_proto(cls, m: index_pb2.CollectionInfo) -> CollectionInfo:
        pooling = types_pb2.Pooling.Name(m.pooling).removeprefix("POOLING_").lower()
        return cls(
            name=m.name,
            model=ModelIdentity.from_proto(m.model),
            layer=m.layer,
            pooling=pooling,
            metric=_METRIC_NAMES.get(m.metric, str(m.metric)),
            kind=_KIND_NAMES.get(m.kind, str(m.kind)),
            params={f: int(getattr(m.params, f)) for f in PARAM_NAMES},
            dimension=m.dimension,
            size=m.size,
            index_bytes=m.index_bytes,
            trained=m.trained,
            created_at=m.created_at,
            log_sequence=m.log_sequence,
        )

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["model"] = dict(self.model.__dict__)
        return data


class Hit(NamedTuple):
    id: str
    score: float  # cosine / inner product: higher is closer; l2: squared distance, lower


@dataclass(frozen=True)
class SearchResults:
    """The answers per query, in query order, and the model version of the collection.

    By column, `ids[i]` and `scores[i]` (float32) are query i's hits, closest first; `hits[i]`
    (also `results[i]`) pairs them as `Hit`s, built on first use."""

    model: ModelIdentity
    ids: list[list[str]]
    scores: list[np.ndarray]

    @cached_property
    def hits(self) -> list[list[Hit]]:
        pair = partial(tuple.__new__, Hit)  # Hit((id, score)) without a Python frame per hit
        return [
            list(map(pair, zip(i, s.tolist(), strict=True)))
            for i, s in zip(self.ids, self.scores, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[Hit]:
        return self.hits[i]

    @classmethod
    def from_proto(cls, response: index_pb2.SearchResponse) -> SearchResults:
        model = ModelIdentity.from_proto(response.model)
        if not response.HasField("packed"):  # per-query results (a server without `packed`)
            ids = [list(r.ids) or [h.id for h in r.hits] for r in response.results]
            scores = [
                np.array(list(r.scores) or [h.score for h in r.hits], np.float32)
                for r in response.results
            ]
            return cls(model, ids, scores)
        packed = response.packed
        flat_ids = list(packed.ids)
        flat_scores = np.array(to_array(packed.scores), np.float32)  # writable, not a view
        ends = list(accumulate(packed.counts))
        if len(flat_ids) != len(flat_scores) or (ends[-1] if ends else 0) != len(flat_ids):
            raise ValueError("malformed packed search response: counts, ids and scores differ")
        starts = [0, *ends[:-1]]
        return cls(
            model,
            [flat_ids[a:b] for a, b in zip(starts, ends, strict=True)],
            [flat_scores[a:b] for a, b in zip(starts, ends, strict=True)],
        )


class UpsertResult(NamedTuple):
    inserted: int
    replaced: int
    log_sequence: int


class RemoveResult(NamedTuple):
    removed: int
    missing: int
    log_sequence: int


def _matrix(vectors: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"vectors must be [n, dim] (or one [dim] vector), got {array.shape}")
    if array.dtype not in (np.float32, np.float16):
        array = array.astype(np.float32)
    return array


def _rows(vectors: np.ndarray | Sequence[np.ndarray]) -> list[types_pb2.Tensor]:
    array = _matrix(vectors)
    if array.dtype == np.dtype("<f4"):  # the common case, without to_tensor's per-row checks
        array = np.ascontiguousarray(array)
        shape = [array.shape[1]]
        f32 = types_pb2.DTYPE_FLOAT32
        return [types_pb2.Tensor(data=row.tobytes(), shape=shape, dtype=f32) for row in array]
    return [to_tensor(row) for row in array]


class IndexAPI(ClientBase):
    def create_collection(
        self,
        name: str,
        model: str,
        *,
        layer: str = "",
        pooling: str = "default",
        metric: str = "cosine",
        kind: str = "flat",
        expect_fingerprint: str = "",
        **params: int,
    ) -> CollectionInfo:
        """Creates (or, with the same definition, returns) a collection bound to `model`
        ("name" or "name@version"). `params`: hnsw_m, hnsw_ef_construction, hnsw_ef_search,
        ivf_nlist, ivf_nprobe, pq_m, pq_nbits, train_min_vectors (0 = server default)."""
        unknown = sorted(set(params) - set(PARAM_NAMES))
        if unknown:
            raise ValueError(f"unknown index parameters {unknown}; known: {list(PARAM_NAMES)}")
        request = index_pb2.CreateCollectionRequest(
            name=name,
            model=model_ref(model, fingerprint=expect_fingerprint),
            layer=layer,
            pooling=_choice(POOLINGS, pooling, "pooling"),
            metric=_choice(METRICS, metric, "metric"),
            kind=_choice(KINDS, kind, "kind"),
            params=index_pb2.IndexParams(**params),
        )
        response = self._call(self._index.CreateCollection, request)
        return CollectionInfo.from_proto(response.collection)

    def delete_collection(self, name: str) -> None:
        self._call(self._index.DeleteCollection, index_pb2.DeleteCollectionRequest(name=name))

    def list_collections(self) -> list[CollectionInfo]:
        response = self._call(self._index.ListCollections, index_pb2.ListCollectionsRequest())
        return [CollectionInfo.from_proto(c) for c in response.collections]

    def describe_collection(self, name: str) -> CollectionInfo:
        request = index_pb2.DescribeCollectionRequest(name=name)
        return CollectionInfo.from_proto(
            self._call(self._index.DescribeCollection, request).collection
        )

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray | Sequence[np.ndarray] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        texts: Sequence[str] | None = None,
        fingerprint: str = "",
        cache: str = "on",
        timeout: float | None = None,
    ) -> UpsertResult:
        """Adds or replaces `ids` with `vectors` (made by the model version `fingerprint`) or with
        `images` (or `texts`, for a text model's collection) that the server embeds. One atomic
        request, durable once this returns."""
        if texts is not None:
            if images is not None:
                raise ValueError("pass images or texts, not both")
            images = [Text(t) for t in texts]
        if (vectors is None) == (images is None):
            raise ValueError("pass either vectors (with their fingerprint) or images")
        values: list[dict[str, Any]]
        if vectors is not None:
            values = [{"vector": t} for t in _rows(vectors)]
        else:
            values = [{"input": image_input(i)} for i in images or ()]
        if len(values) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(values)} vectors or images")
        request = index_pb2.UpsertRequest(
            collection=collection,
            items=[index_pb2.UpsertItem(id=i, **v) for i, v in zip(ids, values, strict=True)],
            fingerprint=fingerprint,
            cache=_choice(CACHE_MODES, cache, "cache"),
        )
        r = self._call(self._index.Upsert, request, timeout)
        return UpsertResult(r.inserted, r.replaced, r.log_sequence)

    def remove(self, collection: str, ids: Sequence[str]) -> RemoveResult:
        request = index_pb2.RemoveRequest(collection=collection, ids=list(ids))
        r = self._call(self._index.Remove, request)
        return RemoveResult(r.removed, r.missing, r.log_sequence)

    def search(
        self,
        collection: str,
        vectors: np.ndarray | Sequence[np.ndarray] | None = None,
        *,
        images: Sequence[ImageLike] | None = None,
        texts: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        k: int = 10,
        fingerprint: str = "",
        ef_search: int = 0,
        nprobe: int = 0,
        timeout: float | None = None,
    ) -> SearchResults:
        """The k nearest stored ids to each query: vectors (with their fingerprint), images
        (embedded by the server), texts (for a text model's collection), or ids already stored
        (searched with their vectors)."""
        if texts is not None:
            if images is not None:
                raise ValueError("pass exactly one of vectors, images, texts or ids")
            images = [Text(t) for t in texts]
        given = [q is not None for q in (vectors, images, ids)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of vectors, images or ids")
        queries: list[index_pb2.Query] = []
        if images is not None:
            queries = [index_pb2.Query(input=image_input(i)) for i in images]
        elif ids is not None:
            queries = [index_pb2.Query(id=i) for i in ids]
        request = index_pb2.SearchRequest(
            collection=collection,
            queries=queries,
            k=k,
            fingerprint=fingerprint,
            hnsw_ef_search=ef_search,
            ivf_nprobe=nprobe,
            packed=True,
        )
        if vectors is None:
            return SearchResults.from_proto(self._call(self._index.Search, request, timeout))
        # The batch form, its matrix spliced into the request's wire form (see tensor.encode).
        method = self._encoded(_INDEX_SERVICE, "Search", index_pb2.SearchResponse)
        payload = encode(request, tensor_field(field_number(request, "vectors"), _matrix(vectors)))
        return SearchResults.from_proto(self._call(method, payload, timeout))


__all__ = [
    "CollectionInfo",
    "Hit",
    "IndexAPI",
    "RemoveResult",
    "SearchResults",
    "UpsertResult",
]
