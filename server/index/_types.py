"""Domain types of similarity search: collection specs, index parameters, limits and validation.

Nothing here knows about gRPC or FAISS. A collection is bound to one model version (name, version
and fingerprint), one layer, one pooling and one metric; its index kind and resolved parameters
are stored with it and never change.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from itertools import accumulate
from typing import Any

import numpy as np

from .._errors import InvalidInput, LimitExceeded
from ..models import ImageSource, TextInput

# --- limits ---------------------------------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ID_BYTES = 512
MAX_BATCH_ITEMS = 10_000  # ids per Upsert or Remove
MAX_QUERIES = 1024  # queries per Search
MAX_K = 1000
DEFAULT_K = 10
MAX_COLLECTIONS = 1000
MAX_DIMENSION = 65_536


class Metric(StrEnum):
    COSINE = "cosine"  # vectors L2-normalised on the way in; scores are cosine similarities
    INNER_PRODUCT = "ip"
    L2 = "l2"  # scores are squared Euclidean distances (lower is closer)


class IndexKind(StrEnum):
    FLAT = "flat"
    HNSW = "hnsw"
    IVF_FLAT = "ivf_flat"
    IVF_PQ = "ivf_pq"

    @property
    def is_ivf(self) -> bool:
        return self in (IndexKind.IVF_FLAT, IndexKind.IVF_PQ)


# --- index parameters -----------------------------------------------------------------------

HNSW_DEFAULTS = {"hnsw_m": 32, "hnsw_ef_construction": 80, "hnsw_ef_search": 64}
IVF_DEFAULT_NLIST = 256
PQ_DEFAULT_NBITS = 8
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per centroid

_HNSW_FIELDS = ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search")
_IVF_FIELDS = ("ivf_nlist", "ivf_nprobe", "train_min_vectors")
_PQ_FIELDS = ("pq_m", "pq_nbits")
# Inclusive bounds of each parameter once resolved.
_BOUNDS = {
    "hnsw_m": (4, 128),
    "hnsw_ef_construction": (8, 2048),
    "hnsw_ef_search": (1, 4096),
    "ivf_nlist": (1, 65_536),
    "ivf_nprobe": (1, 65_536),
    "pq_nbits": (4, 12),
    "train_min_vectors": (1, 10_000_000),
}


@dataclass(frozen=True)
class IndexParams:
    """Index parameters; zero means "the default" in a request and "not applicable" once
    resolved for a collection's kind."""

    hnsw_m: int = 0
    hnsw_ef_construction: int = 0
    hnsw_ef_search: int = 0
    ivf_nlist: int = 0
    ivf_nprobe: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    train_min_vectors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_pq_m(dimension: int) -> int:
    """The most sub-quantizers with at least 4 dimensions each (1280 -> 320, 1000 -> 250):
    `dimension / pq_m * 8 / pq_nbits`-fold compression (16x for float32 at 8 bits)."""
    best = 1
    for m in range(1, dimension // 4 + 1):
        if dimension % m == 0:
            best = m
    return best


def resolve_params(kind: IndexKind, params: IndexParams, dimension: int) -> IndexParams:
    """Fills defaults for `kind`, refuses parameters of other kinds and values out of bounds."""
    relevant: set[str] = set()
    if kind is IndexKind.HNSW:
        relevant.update(_HNSW_FIELDS)
    if kind.is_ivf:
        relevant.update(_IVF_FIELDS)
    if kind is IndexKind.IVF_PQ:
        relevant.update(_PQ_FIELDS)
    given = params.as_dict()
    stray = sorted(k for k, v in given.items() if v and k not in relevant)
    if stray:
        raise InvalidInput(f"index parameters {stray} do not apply to a {kind.value} index")
    values = dict.fromkeys(given, 0)
    if kind is IndexKind.HNSW:
        for key in _HNSW_FIELDS:
            values[key] = given[key] or HNSW_DEFAULTS[key]
    if kind.is_ivf:
        nlist = given["ivf_nlist"] or IVF_DEFAULT_NLIST
        values["ivf_nlist"] = nlist
        values["ivf_nprobe"] = given["ivf_nprobe"] or max(1, nlist // 16)
    if kind is IndexKind.IVF_PQ:
        values["pq_m"] = given["pq_m"] or default_pq_m(dimension)
        values["pq_nbits"] = given["pq_nbits"] or PQ_DEFAULT_NBITS
        if dimension % values["pq_m"]:
            raise InvalidInput(
                f"pq_m {values['pq_m']} must divide the dimension {dimension} "
                f"(the default is {default_pq_m(dimension)})"
            )
    if kind.is_ivf:
        needed = values["ivf_nlist"]
        if kind is IndexKind.IVF_PQ:
            needed = max(needed, 2 ** values["pq_nbits"])
        values["train_min_vectors"] = given["train_min_vectors"] or needed * MIN_POINTS_PER_CENTROID
        if values["train_min_vectors"] < needed:
            raise InvalidInput(
                f"train_min_vectors {values['train_min_vectors']} is below {needed}: k-means "
                "needs at least one training vector per centroid (ivf_nlist, and 2**pq_nbits "
                f"for PQ); {needed * MIN_POINTS_PER_CENTROID} or more trains well"
            )
    for key, (low, high) in _BOUNDS.items():
        value = values[key]
        if value and not low <= value <= high:
            raise InvalidInput(f"{key} {value} is out of range [{low}, {high}]")
    if values["ivf_nprobe"] > values["ivf_nlist"]:
        raise InvalidInput(
            f"ivf_nprobe {values['ivf_nprobe']} exceeds ivf_nlist {values['ivf_nlist']}"
        )
    return IndexParams(**values)


# --- collections ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectionSpec:
    """Everything that defines a collection; stored in the catalog, immutable."""

    name: str
    uid: str  # distinguishes a re-created collection from a deleted one of the same name
    model_name: str
    model_version: str
    fingerprint: str
    weights_sha256: str
    layer: str
    pooling: str  # the concrete pooling, e.g. "avg"
    metric: Metric
    kind: IndexKind
    params: IndexParams
    dimension: int
    created_at: float

    @property
    def model_ref(self) -> str:
        return f"{self.model_name}@{self.model_version}"

    def same_definition(self, other: CollectionSpec) -> bool:
        """Equal in everything a user chose (not the uid or creation time)."""
        return replace(self, uid="", created_at=0.0) == replace(other, uid="", created_at=0.0)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["metric"] = self.metric.value
        data["kind"] = self.kind.value
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CollectionSpec:
        data: dict[str, Any] = json.loads(raw)
        data["metric"] = Metric(data["metric"])
        data["kind"] = IndexKind(data["kind"])
        data["params"] = IndexParams(**data["params"])
        return cls(**data)


@dataclass(frozen=True)
class CollectionInfo:
    spec: CollectionSpec
    size: int
    index_bytes: int
    trained: bool
    log_sequence: int
    broken: str = ""  # why the collection could not be recovered, if it could not


# --- requests and results -------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertItem:
    id: str
    vector: np.ndarray | None = None
    source: ImageSource | TextInput | None = None


@dataclass(frozen=True)
class Query:
    vector: np.ndarray | None = None
    source: ImageSource | TextInput | None = None
    id: str | None = None


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    replaced: int
    log_sequence: int


@dataclass(frozen=True)
class RemoveResult:
    removed: int
    missing: int
    log_sequence: int


@dataclass(frozen=True)
class SearchOverrides:
    hnsw_ef_search: int = 0
    ivf_nprobe: int = 0


@dataclass(frozen=True)
class SearchHits:
    """The hits of a batch of queries, packed: query i's are the next `counts[i]` entries of `ids`
    and `scores`, closest first. One flat list and one array, so that building a response of any
    form costs a few calls per batch rather than a few per hit."""

    ids: list[str]
    scores: np.ndarray  # float32 [len(ids)]
    counts: list[int]

    @classmethod
    def empty(cls, queries: int) -> SearchHits:
        return cls([], np.empty(0, np.float32), [0] * queries)

    def spans(self) -> list[tuple[int, int]]:
        """(start, stop) of each query's hits in `ids` and `scores`."""
        ends = list(accumulate(self.counts))
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def rows(self) -> list[list[tuple[str, float]]]:
        """(id, score) pairs per query."""
        pairs = list(zip(self.ids, self.scores.tolist(), strict=True))
        return [pairs[a:b] for a, b in self.spans()]


@dataclass
class SearchOutcome:
    spec: CollectionSpec
    hits: SearchHits


# --- validation -----------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"collection name {name[:80]!r} is invalid: use 1-64 characters from letters, "
            "digits, '_', '-' and '.', starting with a letter or digit"
        )
    return name


def check_id(value: str, where: str) -> str:
    if not value:
        raise InvalidInput(f"{where}: ids must not be empty")
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise LimitExceeded(f"{where}: id of {size} bytes; the limit is {MAX_ID_BYTES}")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise InvalidInput(f"{where}: id {value[:80]!r} contains control characters")
    return value


def check_ids(ids: Sequence[str], what: str, unique: bool) -> list[str]:
    if not ids:
        raise InvalidInput(f"{what}: send at least one id")
    if len(ids) > MAX_BATCH_ITEMS:
        raise LimitExceeded(
            f"{what}: {len(ids)} ids in one request; the limit is {MAX_BATCH_ITEMS} (split it)"
        )
    out = [check_id(v, f"{what}[{i}]") for i, v in enumerate(ids)]
    if unique and len(set(out)) != len(out):
        seen: set[str] = set()
        for v in out:
            if v in seen:
                raise InvalidInput(f"{what}: id {v[:80]!r} appears more than once in one request")
            seen.add(v)
    return out


def check_k(k: int) -> int:
    k = k or DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise LimitExceeded(f"k {k} is out of range [1, {MAX_K}]")
    return k


def as_matrix(vectors: Sequence[np.ndarray], dimension: int, what: str) -> np.ndarray:
    """Stacks 1-D float vectors of `dimension` into a contiguous float32 matrix; checks values."""
    rows = []
    for i, v in enumerate(vectors):
        if v.dtype not in (np.float32, np.float16):
            raise InvalidInput(f"{what}[{i}]: vectors must be float32 or float16, got {v.dtype}")
        if v.shape != (dimension,):
            raise InvalidInput(
                f"{what}[{i}]: vector of shape {list(v.shape)}; this collection holds vectors "
                f"of shape [{dimension}]"
            )
        rows.append(v)
    return as_batch(np.stack(rows), dimension, what)


def as_batch(batch: np.ndarray, dimension: int, what: str) -> np.ndarray:
    """A [n, dimension] float batch (the one-tensor form of n vectors) as a contiguous float32
    matrix; checks its shape and values like `as_matrix` does row by row."""
    if batch.dtype not in (np.float32, np.float16):
        raise InvalidInput(f"{what}: vectors must be float32 or float16, got {batch.dtype}")
    if batch.ndim != 2 or batch.shape[1] != dimension:
        raise InvalidInput(
            f"{what}: a tensor of shape {list(batch.shape)}; this collection takes [n, "
            f"{dimension}] (a vector of shape [{dimension}] per row)"
        )
    matrix = np.ascontiguousarray(batch, dtype=np.float32)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise InvalidInput(f"{what}[{int(np.argmin(finite))}]: vector holds NaN or infinity")
    return matrix


def normalize_rows(matrix: np.ndarray, what: str) -> np.ndarray:
    """L2-normalises each row (cosine collections); a zero vector has no direction."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    zero = norms[:, 0] <= math.ulp(0.0)
    if zero.any():
        raise InvalidInput(
            f"{what}[{int(np.argmax(zero))}]: a zero vector has no direction (cosine metric)"
        )
    return np.ascontiguousarray(matrix / norms, dtype=np.float32)
