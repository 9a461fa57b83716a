"""Similarity search: FAISS collections bound to the fingerprint of the model version that made
their vectors, made durable by an LMDB write-ahead log and snapshots.

Modules: `_types` (specs, parameters, validation), `_faiss` (one `Engine` per index kind),
`_store` (catalog, log, snapshots), `_collection` (one collection and its locks), `_manager`
(the use cases the servicer calls).
"""

from ._faiss import faiss
from ._manager import IndexManager
from ._types import (
    CollectionInfo,
    CollectionSpec,
    IndexKind,
    IndexParams,
    Metric,
    Query,
    RemoveResult,
    SearchHits,
    SearchOutcome,
    SearchOverrides,
    UpsertItem,
    UpsertResult,
)

__all__ = [
    "CollectionInfo",
    "CollectionSpec",
    "IndexKind",
    "IndexManager",
    "IndexParams",
    "Metric",
    "Query",
    "RemoveResult",
    "SearchHits",
    "SearchOutcome",
    "SearchOverrides",
    "UpsertItem",
    "UpsertResult",
    "faiss",
]
