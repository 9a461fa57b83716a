"""Similarity search: the collections of one server and their use cases (create, drop, upsert,
remove, search), recovery at start, and background maintenance (snapshots, IVF training, HNSW
compaction).

Every collection is bound to one model version fingerprint, layer, pooling and metric. Vectors
sent by clients must name the fingerprint that made them; inputs are embedded with the
collection's exact model version. Nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from .._errors import (
    AlreadyExists,
    DiskFull,
    FailedPrecondition,
    FingerprintMismatch,
    InvalidInput,
    LimitExceeded,
    NotFound,
)
from .._frameworks import available_cores
from .._metrics import METRICS
from .._settings import Settings
from .._storage import FailureLog, disk_full, is_disk_full
from ..models import Pooling, Registry, pool, resolve_pooling
from ..serving import CacheMode, ExtractionService, ExtractOptions, InputSource, ModelManager
from ._collection import Collection, RecoveryCancelled
from ._store import IndexStore
from ._types import (
    MAX_COLLECTIONS,
    MAX_DIMENSION,
    MAX_QUERIES,
    CollectionInfo,
    CollectionSpec,
    IndexKind,
    IndexParams,
    Metric,
    Query,
    RemoveResult,
    SearchOutcome,
    SearchOverrides,
    UpsertItem,
    UpsertResult,
    as_batch,
    as_matrix,
    check_ids,
    check_k,
    check_name,
    normalize_rows,
    resolve_params,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
MAINTENANCE_TICK_S = 1.0


class IndexManager:
    """All collections of one server. Blocking work runs on its own thread pool.

    With `recover_after`, collections are recovered on a background thread once that event is
    set (the server sets it when its startup models are loaded, so a long log replay never
    delays them); until then each is listed and answers UNAVAILABLE with its progress.
    Without it, recovery finishes in the constructor."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        models: ModelManager,
        extraction: ExtractionService,
        recover_after: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.models = models
        self.extraction = extraction
        self.store = IndexStore(settings.index_dir)
        # Separate pools: a writer waiting for its collection (or adding to an HNSW graph for
        # seconds) must never hold the thread a search needs.
        workers = max(2, available_cores())
        self._reads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="index-read")
        self._writes = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="index-write")
        self._rebuilder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-rebuild")
        self._rebuilding: dict[str, Future[bool]] = {}
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._snapshot_failures = FailureLog(log, "snapshot")
        specs = self.store.specs()
        self.store.remove_orphans(specs)
        for spec in specs:
            self._collections[spec.name] = Collection.pending(spec, self.store)
            METRICS.index_recovering.labels(spec.name).set(1)
        self._recovery: threading.Thread | None = None
        if recover_after is None:
            self._recover(specs)
        else:
            self._recovery = threading.Thread(
                target=self._recover_when_set,
                args=(specs, recover_after),
                name="index-recovery",
                daemon=True,
            )
            self._recovery.start()
        self._thread = threading.Thread(
            target=self._maintain, name="index-maintenance", daemon=True
        )
        self._thread.start()

    # --- lifecycle ---------------------------------------------------------------------

    def _recover_when_set(self, specs: list[CollectionSpec], event: threading.Event) -> None:
        while not event.wait(0.2):
            if self._stop.is_set():
                return
        self._recover(specs)

    def _recover(self, specs: list[CollectionSpec]) -> None:
        """Recovers each collection in turn and swaps it in for its placeholder; one whose
        log was replayed is snapshotted at once, so a second crash does not replay it again."""
        for spec in specs:
            placeholder = self._collections.get(spec.name)
            if placeholder is None or placeholder.spec.uid != spec.uid or self._stop.is_set():
                continue  # dropped meanwhile, or stopping

            def progress(done: int, total: int, holder: Collection = placeholder) -> None:
                holder.recovering = (
                    f"replaying its log: {done:,} of {total:,} entries ({100 * done // total}%)"
                    if total
                    else "reading its snapshot"
                )

            started = time.perf_counter()
            try:
                collection = Collection.recover(spec, self.store, progress, placeholder._cancel)
            except RecoveryCancelled:
                continue
            except Exception as exc:
                log.exception("collection %s could not be recovered", spec.name)
                collection = Collection.unrecoverable(
                    spec, self.store, f"recovery failed: {type(exc).__name__}: {exc}"
                )
            with self._lock:
                swapped = self._collections.get(spec.name) is placeholder
                if swapped:
                    self._collections[spec.name] = collection
            if not swapped:  # dropped while it was recovered
                collection.close()
                continue
            METRICS.index_recovering.labels(spec.name).set(0)
            collection.publish_metrics()
            log.info(
                "collection %s serving (recovered in %.1fs)",
                spec.name,
                time.perf_counter() - started,
            )
            if collection.dirty:
                self._snapshot(collection)

    def _snapshot(self, collection: Collection) -> None:
        """A snapshot now; failures are logged once a minute with their count (a full disk
        would otherwise log one traceback per maintenance tick)."""
        try:
            collection.snapshot()
        except Exception as exc:
            full = isinstance(exc, DiskFull) or is_disk_full(exc, self.settings.index_dir)
            reason = "disk_full" if full else "error"
            METRICS.storage_write_failures.labels("snapshot", reason).inc()
            if reason == "error":
                log.exception("snapshot of %s failed", collection.spec.name)
            self._snapshot_failures.failed(
                f"{collection.spec.name}: {exc}; its log still has every change"
            )
        else:
            self._snapshot_failures.recovered()

    def close(self) -> None:
        """Stops maintenance, snapshots every changed collection, closes the log."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        for collection in list(self._collections.values()):
            collection.cancel_background()
        if self._recovery is not None:
            self._recovery.join(timeout=60)
        self._rebuilder.shutdown(wait=True, cancel_futures=True)
        for collection in list(self._collections.values()):
            try:
                collection.snapshot()
            except Exception:
                log.exception(
                    "final snapshot of %s failed; its log still has every change",
                    collection.spec.name,
                )
            collection.close()
        self._reads.shutdown(wait=True)
        self._writes.shutdown(wait=True)
        self.store.close()

    def _maintain(self) -> None:
        interval = self.settings.index_snapshot_interval_s
        while not self._stop.is_set():
            self._wake.wait(MAINTENANCE_TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            for collection in list(self._collections.values()):
                self._maybe_rebuild(collection)
                due = time.monotonic() - collection.last_snapshot >= interval
                if interval > 0 and collection.dirty and due:
                    self._snapshot(collection)
                    collection.last_snapshot = time.monotonic()  # a failure retries later

    def _maybe_rebuild(self, collection: Collection) -> None:
        uid = collection.spec.uid
        running = self._rebuilding.get(uid)
        if (running is not None and not running.done()) or not collection.wants_rebuild():
            return
        try:
            self._rebuilding[uid] = self._rebuilder.submit(self._rebuild, collection)
        except RuntimeError:  # shutting down
            return

    def _rebuild(self, collection: Collection) -> bool:
        try:
            return collection.rebuild()
        except Exception:
            log.exception("background rebuild of %s failed", collection.spec.name)
            return False

    # --- catalog -----------------------------------------------------------------------

    def _get(self, name: str) -> Collection:
        check_name(name)
        collection = self._collections.get(name)
        if collection is None:
            known = ", ".join(sorted(self._collections)[:20]) or "none"
            raise NotFound(f"no collection {name!r}; collections: {known}")
        return collection

    def create(
        self,
        name: str,
        model_name: str,
        model_version: str,
        layer: str,
        pooling: Pooling,
        metric: Metric,
        kind: IndexKind,
        params: IndexParams,
    ) -> CollectionInfo:
        check_name(name)
        manifest = self.registry.resolve(model_name, model_version)
        layer_spec = manifest.layer(layer or manifest.default_layer)
        concrete = resolve_pooling(layer_spec, pooling)
        shape = pool(np.zeros(layer_spec.shape, np.float32), layer_spec, concrete).shape
        if len(shape) != 1:
            raise InvalidInput(
                f"layer {layer_spec.name!r} with pooling {concrete.value!r} gives shape "
                f"{list(shape)}; a collection holds vectors: pool it (avg or max)"
            )
        if shape[0] > MAX_DIMENSION:
            raise LimitExceeded(f"dimension {shape[0]} exceeds {MAX_DIMENSION}")
        spec = CollectionSpec(
            name=name,
            uid=secrets.token_hex(8),
            model_name=manifest.name,
            model_version=manifest.version,
            fingerprint=manifest.fingerprint(),
            weights_sha256=manifest.weights.sha256,
            layer=layer_spec.name,
            pooling=concrete.value,
            metric=metric,
            kind=kind,
            params=resolve_params(kind, params, shape[0]),
            dimension=int(shape[0]),
            created_at=time.time(),
        )
        with self._lock:
            existing = self._collections.get(name)
            if existing is not None:
                if existing.spec.same_definition(spec):  # idempotent (once it is recovered)
                    return existing.info(check=True)
                raise AlreadyExists(
                    f"collection {name!r} exists with another definition "
                    f"({_describe(existing.spec)}); drop it first or choose another name"
                )
            if len(self._collections) >= MAX_COLLECTIONS:
                raise FailedPrecondition(
                    f"{len(self._collections)} collections exist, the limit; drop one first"
                )
            with self._disk_full_is_resource_exhausted(f"creating collection {name!r}"):
                collection = Collection.create(spec, self.store)
            self._collections[name] = collection
        log.info("created collection %s (%s)", name, _describe(spec))
        return collection.info()

    def delete(self, name: str) -> None:
        with self._lock:
            collection = self._get(name)
            del self._collections[name]
        collection.close()  # waits for in-flight writes and snapshots
        try:
            with self._disk_full_is_resource_exhausted(f"dropping collection {name!r}"):
                self.store.drop(collection.spec)
        except DiskFull:  # nothing was dropped (one transaction): the collection stays
            restored = Collection.recover(collection.spec, self.store)
            with self._lock:
                self._collections.setdefault(name, restored)
            raise
        self._rebuilding.pop(collection.spec.uid, None)
        for gauge in (METRICS.index_vectors, METRICS.index_bytes, METRICS.index_recovering):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        log.info("dropped collection %s", name)

    def list_collections(self) -> list[CollectionInfo]:
        return [self._collections[n].info() for n in sorted(self._collections)]

    def describe(self, name: str) -> CollectionInfo:
        return self._get(name).info(check=True)

    @contextlib.contextmanager
    def _disk_full_is_resource_exhausted(self, what: str) -> Iterator[None]:
        """A full disk under a write a client waits for becomes `DiskFull` (RESOURCE_EXHAUSTED,
        naming the data dir and its free space), never INTERNAL."""
        try:
            yield
        except Exception as exc:
            if not is_disk_full(exc, self.settings.index_dir):
                raise
            METRICS.storage_write_failures.labels("index", "disk_full").inc()
            raise disk_full(self.settings.data_dir, what) from None

    # --- writes and searches -----------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Runs a blocking read (search, describe) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, *args)

    async def run_write(self, fn: Callable[..., T], *args: object) -> T:
        """Runs a blocking change (create, drop, upsert, remove) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._writes, fn, *args)

    async def upsert(
        self,
        name: str,
        items: Sequence[UpsertItem],
        fingerprint: str,
        cache: CacheMode = CacheMode.ON,
    ) -> UpsertResult:
        collection = self._get(name)
        collection.check_usable()
        spec = collection.spec
        ids = check_ids([item.id for item in items], "items", unique=True)
        rows: list[np.ndarray | None] = [item.vector for item in items]
        if any(row is not None for row in rows):
            self._check_fingerprint(spec, fingerprint, "vectors in items")
        sources = [(i, item.source) for i, item in enumerate(items) if item.source is not None]
        if sources:
            embedded = await self._embed(spec, [s for _, s in sources], cache, "items")
            for (i, _), vector in zip(sources, embedded, strict=True):
                rows[i] = vector
        if any(row is None for row in rows):
            raise InvalidInput("every item needs a vector or an input")
        matrix = as_matrix([r for r in rows if r is not None], spec.dimension, "items")
        if spec.metric is Metric.COSINE:
            matrix = normalize_rows(matrix, "items")
        what = f"upsert of {len(ids)} vectors into {name!r}"
        with self._disk_full_is_resource_exhausted(what):
            result = await self.run_write(collection.upsert, ids, matrix)
        if collection.wants_rebuild():
            self._wake.set()
        return result

    async def remove(self, name: str, ids: Sequence[str]) -> RemoveResult:
        collection = self._get(name)
        collection.check_usable()
        checked = check_ids(ids, "ids", unique=False)
        what = f"removal of {len(checked)} ids from {name!r}"
        with self._disk_full_is_resource_exhausted(what):
            result = await self.run_write(collection.remove, checked)
        if collection.wants_rebuild():
            self._wake.set()
        return result

    async def search(
        self,
        name: str,
        queries: Sequence[Query] | np.ndarray,
        k: int,
        fingerprint: str,
        overrides: SearchOverrides | None = None,
    ) -> SearchOutcome:
        """`queries`: Query objects, or a [n, dim] batch of query vectors (one per row)."""
        collection = self._get(name)
        collection.check_usable()
        spec = collection.spec
        k = check_k(k)
        if isinstance(queries, np.ndarray):  # its shape first: a 1-D array's len is no count
            queries = as_batch(queries, spec.dimension, "vectors")
        if not len(queries):
            raise InvalidInput("queries: send at least one query")
        if len(queries) > MAX_QUERIES:
            raise LimitExceeded(
                f"{len(queries)} queries in one request; the limit is {MAX_QUERIES}"
            )
        overrides = overrides or SearchOverrides()
        _check_overrides(spec, overrides)
        by_id: list[tuple[int, str]] = []
        if isinstance(queries, np.ndarray):
            self._check_fingerprint(spec, fingerprint, "vector queries")
            matrix = normalize_rows(queries, "vectors") if spec.metric is Metric.COSINE else queries
        else:
            matrix, by_id = await self._query_matrix(spec, queries, fingerprint)
        hits = await self.run(collection.search, matrix, by_id, k, overrides)
        return SearchOutcome(spec, hits)

    async def _query_matrix(
        self, spec: CollectionSpec, queries: Sequence[Query], fingerprint: str
    ) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """The query matrix (rows of id queries left zero) and the (row, id) of id queries."""
        matrix = np.zeros((len(queries), spec.dimension), dtype=np.float32)
        vector_rows = [i for i, q in enumerate(queries) if q.vector is not None]
        if vector_rows:
            self._check_fingerprint(spec, fingerprint, "vector queries")
            vectors = [q.vector for q in queries if q.vector is not None]
            matrix[vector_rows] = as_matrix(vectors, spec.dimension, "queries")
        source_rows = [i for i, q in enumerate(queries) if q.source is not None]
        if source_rows:
            sources = [q.source for q in queries if q.source is not None]
            embedded = await self._embed(spec, sources, CacheMode.ON, "queries")
            matrix[source_rows] = np.stack(embedded)
        by_id = [(i, q.id) for i, q in enumerate(queries) if q.id is not None]
        for i, value in by_id:
            check_ids([value], f"queries[{i}].id", unique=False)
        if spec.metric is Metric.COSINE and (vector_rows or source_rows):
            rows = vector_rows + source_rows
            matrix[rows] = normalize_rows(matrix[rows], "queries")
        return matrix, by_id

    # --- model binding -----------------------------------------------------------------

    def _check_fingerprint(self, spec: CollectionSpec, fingerprint: str, what: str) -> None:
        if not fingerprint:
            raise InvalidInput(
                f"{what}: set `fingerprint` to the fingerprint of the model version that made "
                f"them (ExtractResponse.model.fingerprint); collection {spec.name!r} is bound "
                f"to {spec.model_ref} (fingerprint {spec.fingerprint})"
            )
        if fingerprint != spec.fingerprint:
            other = self.registry.by_fingerprint(fingerprint)
            named = f" ({other.ref})" if other is not None else ""
            raise FingerprintMismatch(
                f"collection {spec.name!r} is bound to {spec.model_ref} with fingerprint "
                f"{spec.fingerprint}, but the {what} come from fingerprint {fingerprint}{named}: "
                "vectors of different model versions are not comparable; embed with "
                f"{spec.model_ref} or use a collection bound to that version"
            )

    async def _embed(
        self, spec: CollectionSpec, sources: Sequence[InputSource], cache: CacheMode, what: str
    ) -> list[np.ndarray]:
        """Embeds inputs with the collection's exact model version, layer and pooling."""
        try:
            model = self.models.get(spec.model_name, spec.model_version)
        except FailedPrecondition as exc:
            raise FailedPrecondition(
                f"collection {spec.name!r} embeds {what} with {spec.model_ref}, which cannot "
                f"serve: {exc}"
            ) from None
        except NotFound:
            raise FailedPrecondition(
                f"collection {spec.name!r} is bound to {spec.model_ref}, which this server "
                "does not register: send vectors, or start the server with its manifest"
            ) from None
        if model.identity.fingerprint != spec.fingerprint:
            raise FingerprintMismatch(
                f"collection {spec.name!r} is bound to {spec.model_ref} with fingerprint "
                f"{spec.fingerprint}, but the loaded {spec.model_ref} has fingerprint "
                f"{model.identity.fingerprint} (its manifest or weights changed): create a "
                "new collection for the new version"
            )
        options = ExtractOptions(
            layers=(spec.layer,), pooling=Pooling(spec.pooling), dtype="float32", cache=cache
        )
        step = max(1, self.settings.max_inputs_per_request)
        out: list[np.ndarray] = []
        for start in range(0, len(sources), step):
            chunk = sources[start : start + step]
            try:
                result = await self.extraction.extract(
                    spec.model_name, spec.model_version, chunk, options
                )
            except InvalidInput as exc:
                raise type(exc)(f"{what} (inputs from #{start} of this request): {exc}") from None
            if result.identity.fingerprint != spec.fingerprint:
                raise FingerprintMismatch(
                    f"collection {spec.name!r}: {spec.model_ref} changed while embedding "
                    f"(fingerprint {result.identity.fingerprint}, expected {spec.fingerprint})"
                )
            out.extend(np.asarray(item[0].array, np.float32).reshape(-1) for item in result.items)
        return out


def _check_overrides(spec: CollectionSpec, overrides: SearchOverrides) -> None:
    if overrides.hnsw_ef_search:
        if spec.kind is not IndexKind.HNSW:
            raise InvalidInput(f"hnsw_ef_search applies to HNSW collections, not {spec.kind}")
        if not 1 <= overrides.hnsw_ef_search <= 4096:
            raise LimitExceeded(f"hnsw_ef_search {overrides.hnsw_ef_search} not in [1, 4096]")
    if overrides.ivf_nprobe:
        if not spec.kind.is_ivf:
            raise InvalidInput(f"ivf_nprobe applies to IVF collections, not {spec.kind}")
        if overrides.ivf_nprobe > spec.params.ivf_nlist:
            raise LimitExceeded(
                f"ivf_nprobe {overrides.ivf_nprobe} exceeds ivf_nlist {spec.params.ivf_nlist}"
            )


def _describe(spec: CollectionSpec) -> str:
    return (
        f"{spec.model_ref} layer {spec.layer} pooling {spec.pooling}, {spec.metric.value}, "
        f"{spec.kind.value}, dimension {spec.dimension}"
    )
