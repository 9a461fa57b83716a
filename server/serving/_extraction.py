"""The extraction use case: validate, consult the cache, decode and preprocess in a worker pool
beside inference, batch dynamically, pool, and store new results.

Nothing here knows about gRPC: the servicer converts messages to these types and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import numpy as np

from .._errors import InvalidInput, LimitExceeded
from .._frameworks import available_cores
from .._metrics import METRICS
from .._settings import Settings
from ..models import (
    OUTPUT_DTYPES,
    ImageSource,
    LayerSpec,
    Pooling,
    RawImage,
    TextInput,
    finish,
    output_layout,
    resolve_pooling,
)
from ._batching import ItemOutput
from ._manager import LoadedModel, ModelIdentity, ModelManager

T = TypeVar("T")
InputSource = ImageSource | TextInput

# Requests up to this many input bytes are hashed while the event loop waits (≤ ~3 ms on 2
# cores); larger ones are awaited on the pool, so that the loop is never held for long.
INLINE_HASH_BYTES = 8 << 20
# From this many input bytes on, hashing is split between the loop thread and pool workers
# (hashlib lets go of the GIL): a batch of 256 224x224 JPEGs (3.5 MB) hashes in 1.1 ms on
# 2 cores instead of 2.1. Below it, handing a share to a worker costs more than it saves.
SPLIT_HASH_BYTES = 256 << 10
# Background requests (verification) decode and queue this many inputs at a time, so that the
# decode pool and the lanes never hold more than a few of them ahead of a foreground request.
BACKGROUND_CHUNK = 4


class CacheMode(StrEnum):
    ON = "on"
    OFF = "off"
    REFRESH = "refresh"


@dataclass(frozen=True)
class ExtractOptions:
    layers: tuple[str, ...] = ()
    pooling: Pooling = Pooling.DEFAULT
    dtype: str = "float32"
    normalize: bool = False
    cache: CacheMode = CacheMode.ON
    background: bool = False  # yield to foreground requests (see _batching)


class Embedding(NamedTuple):  # a tuple: built per item and layer on the cache-hit path
    layer: str
    array: np.ndarray
    layout: str
    cached: bool


@dataclass
class Timings:
    cache: float = 0.0
    queue: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "cache": self.cache,
            "queue": self.queue,
            "preprocess": self.preprocess,
            "inference": self.inference,
            "total": self.total,
        }


@dataclass
class ExtractResult:
    identity: ModelIdentity
    items: list[list[Embedding]]
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class PlannedLayer:
    spec: LayerSpec
    pooling: Pooling
    layout: str


class EmbeddingCache(Protocol):
    """What extraction needs from the cache (the LMDB implementation: the `cache` package)."""

    def keys(
        self,
        fingerprint: str,
        layer: str,
        pooling: str,
        dtype: str,
        normalize: bool,
        input_digests: Sequence[bytes],
    ) -> list[bytes]: ...

    def lookup(self, keys: Sequence[bytes]) -> list[np.ndarray | None]: ...

    def store(self, fingerprint: str, entries: Sequence[tuple[bytes, np.ndarray]]) -> None: ...


@dataclass(frozen=True)
class CacheHit:
    """A served cache hit, handed to the audit hook (which recomputes a sample off-path)."""

    source: InputSource
    layer: PlannedLayer
    options: ExtractOptions
    array: np.ndarray
    key: bytes


class CacheAuditor(Protocol):
    """Recomputes a sample of served cache hits off the request path (the consistency
    monitor). Sampling comes first so that unsampled hits cost nothing."""

    def sample(self, count: int) -> Sequence[int]:
        """Which of `count` lookups (indices) to audit; usually none."""
        ...

    def audit(self, model: LoadedModel, hits: list[CacheHit]) -> None: ...


def input_digest(source: InputSource) -> bytes:
    """SHA-256 of the input exactly as sent (raw arrays include their shape and dtype, texts a
    prefix that no encoded image starts with)."""
    if isinstance(source, TextInput):
        return hashlib.sha256(b"embedwarden-text:" + source.data).digest()
    if isinstance(source, RawImage):
        digest = hashlib.sha256(f"raw:{source.dtype}:{list(source.shape)}:".encode())
        digest.update(source.data)
        return digest.digest()
    return hashlib.sha256(source).digest()


def _digest_all(sources: Sequence[InputSource]) -> list[bytes]:
    return [input_digest(s) for s in sources]


def plan_layers(model: LoadedModel, options: ExtractOptions) -> list[PlannedLayer]:
    manifest = model.manifest
    names = options.layers or (manifest.default_layer,)
    if len(set(names)) != len(names):
        raise InvalidInput(f"layers are repeated: {list(names)}")
    planned = []
    for name in names:
        spec = manifest.layer(name)
        pooling = resolve_pooling(spec, options.pooling)
        planned.append(PlannedLayer(spec, pooling, output_layout(spec, pooling)))
    return planned


class ExtractionService:
    def __init__(
        self,
        models: ModelManager,
        settings: Settings,
        executor: Executor,
        cache: EmbeddingCache | None,
        auditor: CacheAuditor,
    ) -> None:
        self.models = models
        self.settings = settings
        self.executor = executor
        self.cache = cache  # None: the server runs without a cache
        self.auditor = auditor

    def validate(self, sources: Sequence[InputSource], options: ExtractOptions) -> None:
        if not sources:
            raise InvalidInput("no inputs: send at least one image or text")
        limit = self.settings.max_inputs_per_request
        if len(sources) > limit:
            raise LimitExceeded(
                f"{len(sources)} inputs in one request; the limit is {limit} (split the batch, "
                "or use ExtractStream)"
            )
        if options.dtype not in OUTPUT_DTYPES:
            raise InvalidInput(f"dtype {options.dtype!r}: expected float32 or float16")

    async def extract(
        self, name: str, version: str, sources: Sequence[InputSource], options: ExtractOptions
    ) -> ExtractResult:
        started = time.perf_counter()
        self.validate(sources, options)
        model = self.models.get(name, version)
        check_modality(model, sources)
        with model.use():
            result = await self._extract(model, sources, options)
        result.timings.total = time.perf_counter() - started
        manifest = model.manifest
        METRICS.observe_stages(manifest.name, manifest.version, result.timings.as_dict())
        return result

    async def _extract(
        self, model: LoadedModel, sources: Sequence[InputSource], options: ExtractOptions
    ) -> ExtractResult:
        plan = plan_layers(model, options)
        identity = model.identity
        timings = Timings()
        n = len(sources)
        results: list[list[Embedding | None]] = [[None] * len(plan) for _ in range(n)]
        width = len(plan)
        keys: list[bytes] = []  # item-major: the key of item i, layer j is keys[i * width + j]
        cache = self.cache if options.cache is not CacheMode.OFF else None

        if cache is not None:
            t0 = time.perf_counter()
            digests = await self._digests(sources)
            # Per-item work is kept to the key and the lookup (cache hits are the hot path).
            columns = [
                cache.keys(
                    identity.fingerprint,
                    p.spec.name,
                    p.pooling.value,
                    options.dtype,
                    options.normalize,
                    digests,
                )
                for p in plan
            ]
            keys = columns[0] if width == 1 else [k for r in zip(*columns, strict=True) for k in r]
            if options.cache is CacheMode.ON:
                found = cache.lookup(keys)
                for j, p in enumerate(plan):
                    name, layout = p.spec.name, p.layout
                    for i, array in enumerate(found[j::width]):
                        if array is not None:
                            results[i][j] = Embedding(name, array, layout, True)
                self._audit(model, sources, plan, options, keys, found)
            timings.cache = time.perf_counter() - t0

        todo = [i for i, row in enumerate(results) if None in row]
        hit_items = n - len(todo)
        if hit_items:
            METRICS.items.labels(identity.name, identity.version, "cache").inc(hit_items)
        if todo:
            outputs = await self._compute_all(
                model, sources, todo, [p.spec.name for p in plan], options.background
            )
            fresh: list[tuple[bytes, np.ndarray]] = []
            for i, (output, prep_s) in zip(todo, outputs, strict=True):
                timings.preprocess = max(timings.preprocess, prep_s)
                timings.queue = max(timings.queue, output.queue_seconds)
                timings.inference = max(timings.inference, output.inference_seconds)
                for j, p in enumerate(plan):
                    if results[i][j] is not None:
                        continue  # a hit for this layer: the cached bytes are served
                    array = finish(
                        output.outputs[p.spec.name],
                        p.spec,
                        p.pooling,
                        options.normalize,
                        options.dtype,
                    )
                    results[i][j] = Embedding(p.spec.name, array, p.layout, False)
                    if cache is not None:
                        fresh.append((keys[i * width + j], array))
            METRICS.items.labels(identity.name, identity.version, "model").inc(len(todo))
            if cache is not None and fresh:
                cache.store(identity.fingerprint, fresh)
        # Every slot is filled now (a hit, or computed above); a copy to drop the Nones from
        # the type cost ~0.4 ms a batch of 256 hits.
        return ExtractResult(identity, cast(list[list[Embedding]], results), timings)

    def _audit(
        self,
        model: LoadedModel,
        sources: Sequence[InputSource],
        plan: list[PlannedLayer],
        options: ExtractOptions,
        keys: list[bytes],
        found: list[np.ndarray | None],
    ) -> None:
        """Hands the auditor its sample of this request's lookups that were hits (each lookup
        is sampled alike, so each hit is audited with the configured probability)."""
        width = len(plan)
        hits = [
            CacheHit(sources[f // width], plan[f % width], options, array, keys[f])
            for f in self.auditor.sample(len(found))
            if (array := found[f]) is not None
        ]
        if hits:
            self.auditor.audit(model, hits)

    async def _digests(self, sources: Sequence[InputSource]) -> list[bytes]:
        total = sum(len(s) if isinstance(s, bytes) else len(s.data) for s in sources)
        workers = self.settings.decode_workers or available_cores()
        parts = max(1, min(len(sources), workers, total // SPLIT_HASH_BYTES))
        if parts == 1:
            return _digest_all(sources)
        step = -(-len(sources) // parts)
        chunks = [sources[i : i + step] for i in range(0, len(sources), step)]
        if total <= INLINE_HASH_BYTES:
            return self._digests_beside_loop(chunks)
        # A large request hashes entirely on the pool: the loop serves others meanwhile.
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(
            *(loop.run_in_executor(self.executor, _digest_all, chunk) for chunk in chunks)
        )
        return [d for part in done for d in part]

    def _digests_beside_loop(self, chunks: list[Sequence[InputSource]]) -> list[bytes]:
        """The loop thread hashes the first chunk while pool workers hash the others. A chunk
        that no worker has started yet (the pool busy decoding) is taken back and hashed here,
        so this never waits in the pool's queue; one that a worker runs ends about when the
        loop's own chunk does."""
        pending = [self.executor.submit(_digest_all, chunk) for chunk in chunks[1:]]
        digests = _digest_all(chunks[0])
        for chunk, future in zip(chunks[1:], pending, strict=True):
            digests += _digest_all(chunk) if future.cancel() else future.result()
        return digests

    async def _compute_all(
        self,
        model: LoadedModel,
        sources: Sequence[InputSource],
        todo: list[int],
        layers: list[str],
        background: bool,
    ) -> list[tuple[ItemOutput, float]]:
        # Foreground: one reservation for the whole request, refused before any decoding when
        # full. Background: a few inputs at a time, so they never hold many slots ahead.
        step = BACKGROUND_CHUNK if background else max(len(todo), 1)
        outputs: list[tuple[ItemOutput, float]] = []
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            with model.batcher.reserve(len(chunk), background):
                outputs += await _gather_or_cancel(
                    [self._compute(model, i, sources[i], layers, background) for i in chunk]
                )
        return outputs

    async def _compute(
        self,
        model: LoadedModel,
        index: int,
        source: InputSource,
        layers: list[str],
        background: bool,
    ) -> tuple[ItemOutput, float]:
        """Decodes on the pool, whose thread then queues the tensor for inference itself: the
        loop wakes once, for the output, rather than also between decoding and the batcher."""
        loop = asyncio.get_running_loop()
        max_pixels = self.settings.max_image_pixels
        done: asyncio.Future[tuple[ItemOutput, float]] = loop.create_future()
        queued: list[Future[ItemOutput]] = []

        def fail(exc: BaseException) -> None:  # on the loop
            if not done.done():  # else cancelled meanwhile
                done.set_exception(exc)

        def deliver(output: Future[ItemOutput], prep_s: float) -> None:  # on the loop
            if done.done():
                return
            if output.cancelled():
                done.cancel()
            elif (exc := output.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result((output.result(), prep_s))

        def decode_and_queue() -> None:  # on a pool thread
            t0 = time.perf_counter()
            try:
                tensor = model.preprocessor.prepare(source, max_pixels)
                prep_s = time.perf_counter() - t0
                output = model.batcher.submit(tensor, layers, background)
            except BaseException as exc:  # delivered to the request, whatever it is
                if isinstance(exc, InvalidInput):
                    exc = type(exc)(f"inputs[{index}]: {exc}")
                _call_on(loop, fail, exc)
                return
            queued.append(output)
            output.add_done_callback(lambda f: _call_on(loop, deliver, f, prep_s))

        decoding = self.executor.submit(decode_and_queue)
        try:
            return await done
        except asyncio.CancelledError:
            decoding.cancel()  # not started yet: never decoded
            for output in queued:
                output.cancel()  # still queued: never run
            raise


def check_modality(model: LoadedModel, sources: Sequence[InputSource]) -> None:
    """A text model refuses images and an image model texts, before any work is done."""
    text = model.manifest.modality == "text"
    for i, source in enumerate(sources):
        if isinstance(source, TextInput) != text:
            want, got = ("text", "an image") if text else ("image", "a text")
            raise InvalidInput(
                f"inputs[{i}] is {got}; {model.identity.ref} is a{'' if text else 'n'} {want} "
                f"model: send {'`text`' if text else '`encoded` or `raw` images'}"
            )


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """`fn(*args)` on `loop` from another thread; nothing when the loop has closed (shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


async def _gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest (queued items then never run)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
