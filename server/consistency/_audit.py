"""Cache audit: recomputes sampled cache hits off the request path and compares them with the
cached arrays.

`AuditQueue` is the request-path half (the `serving.CacheAuditor` that extraction calls):
which hits to recompute, within a CPU budget and a bounded queue. `audit_hits` is the other
half, run on the consistency monitor's thread.

A hit's vector was computed inside whatever batch the dynamic batcher formed then; the audit
recomputes it alone. Results: `match` (bit-identical), `within_tolerance` (differs by batch
rounding only, within the manifest's tolerance) or `mismatch` (counted, logged, and the entry
overwritten with the recomputed vector when the cache is known).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from .._errors import EmbedwardenError
from .._metrics import METRICS
from ..models import finish
from ..serving import CacheHit, EmbeddingCache, LoadedModel
from . import _report as report
from ._checks import Diff, compare
from ._report import Outcome
from ._tolerance import Tolerance

log = logging.getLogger(__name__)
RESULTS = ("match", "within_tolerance", "mismatch")
QUEUE_BYTES = 64 << 20  # inputs of sampled hits awaiting recomputation; more: dropped


class AuditQueue:
    """Samples served cache hits and queues them for recomputation. A token bucket bounds the
    recomputations to `max_per_s` inputs per second, so that a heavy cache-hit load cannot turn
    the audit into the main consumer of CPU; `wake` is called when work was queued."""

    def __init__(self, fraction: float, max_per_s: float, wake: Callable[[], None]) -> None:
        self.fraction = fraction
        self.max_per_s = max_per_s
        self._wake = wake
        self._lock = threading.Lock()
        self._queue: deque[tuple[LoadedModel, list[CacheHit], int]] = deque()
        self._bytes = 0
        self._random = random.Random()
        self._tokens = max(1.0, max_per_s)
        self._refilled = time.monotonic()

    def sample(self, count: int) -> list[int]:
        """On the request path: which of `count` cache lookups to recompute if they hit."""
        if self.fraction <= 0:
            return []
        if self.fraction >= 1:
            return list(range(count))
        draw = self._random.random
        return [i for i in range(count) if draw() < self.fraction]

    def audit(self, model: LoadedModel, chosen: list[CacheHit]) -> None:
        """On the request path: queues sampled hits for recomputation, within the budget."""
        if not chosen:
            return
        sources = {id(h.source): h.source for h in chosen}
        allowed = self._take_tokens(len(sources))
        if allowed < len(sources):
            kept = set(list(sources)[:allowed])
            skipped = [h for h in chosen if id(h.source) not in kept]
            METRICS.cache_audit_skipped.labels(model.identity.name, model.identity.version).inc(
                len(skipped)
            )
            chosen = [h for h in chosen if id(h.source) in kept]
            sources = {k: v for k, v in sources.items() if k in kept}
            if not chosen:
                return
        size = sum(len(s) if isinstance(s, bytes) else len(s.data) for s in sources.values())
        with self._lock:
            if self._bytes + size > QUEUE_BYTES:
                log.debug(
                    "%s: cache audit queue full; %d hits not audited",
                    model.identity.ref,
                    len(chosen),
                )
                return
            self._bytes += size
            self._queue.append((model, chosen, size))
        self._wake()

    def take(self) -> tuple[LoadedModel, list[CacheHit]] | None:
        """The oldest queued hits of one request, or None when the queue is empty."""
        with self._lock:
            if not self._queue:
                return None
            model, hits, size = self._queue.popleft()
            self._bytes -= size
            return model, hits

    def _take_tokens(self, wanted: int) -> int:
        """How many of `wanted` recomputations the budget allows now (taken from it)."""
        rate = self.max_per_s
        with self._lock:
            now = time.monotonic()
            capacity = max(1.0, rate)
            self._tokens = min(capacity, self._tokens + (now - self._refilled) * rate)
            self._refilled = now
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            return granted


def audit_one(hit: CacheHit, output: np.ndarray, tol: Tolerance) -> tuple[str, Diff, np.ndarray]:
    """Judges one hit against the layer output recomputed for its input."""
    spec = hit.layer.spec
    fresh = finish(output, spec, hit.layer.pooling, hit.options.normalize, hit.options.dtype)
    cached = np.asarray(hit.array)
    if cached.dtype == fresh.dtype and cached.shape == fresh.shape:
        if cached.tobytes() == fresh.tobytes():
            return "match", Diff(0.0, 1.0, True), fresh
        diff = compare([(cached.reshape(1, -1), fresh.reshape(1, -1))], tol)
    else:
        diff = Diff(math.inf, 0.0, False, "shape or dtype differs")
    return ("within_tolerance" if diff.passed else "mismatch"), diff, fresh


def audit_hits(
    model: LoadedModel,
    hits: list[CacheHit],
    max_pixels: int,
    cache: EmbeddingCache | None,
) -> list[Outcome]:
    """Recomputes `hits` (one forward pass per distinct input); returns one row per layer."""
    ident = model.identity
    tol = Tolerance.of(model.manifest, exact=False)
    by_source: dict[int, list[CacheHit]] = {}
    for hit in hits:
        by_source.setdefault(id(hit.source), []).append(hit)
    per_layer: dict[str, list[tuple[str, Diff]]] = {}
    for group in by_source.values():
        try:  # it decoded when it was computed; still, one bad input must not stop the audit
            tensor = model.preprocessor.prepare(group[0].source, max_pixels)
        except EmbedwardenError as exc:
            log.warning("%s: a cached input could not be re-read for audit: %s", ident.ref, exc)
            continue
        outputs = model.backbone.infer(tensor[None], sorted({h.layer.spec.name for h in group}))
        for hit in group:
            result, diff, fresh = audit_one(hit, outputs[hit.layer.spec.name][0], tol)
            METRICS.cache_audit.labels(ident.name, ident.version, result).inc()
            per_layer.setdefault(hit.layer.spec.name, []).append((result, diff))
            if result == "mismatch":
                log.error(
                    "%s: cached %s vector %s... differs from its recomputation (max |d| %.3g); "
                    "overwriting the entry",
                    ident.ref,
                    hit.layer.spec.name,
                    hit.key.hex()[:16],
                    diff.max_abs,
                )
                if cache is not None:
                    cache.store(ident.fingerprint, [(hit.key, fresh)])
    now = time.time()
    rows = []
    for layer, results in per_layer.items():
        counts = {r: sum(x == r for x, _ in results) for r in RESULTS}
        combined = Diff(
            max(d.max_abs for _, d in results),
            min(d.min_cosine for _, d in results),
            counts["mismatch"] == 0,
        )
        detail = (
            f"{len(results)} cached vector(s) recomputed: {counts['match']} bit-identical, "
            f"{counts['within_tolerance']} within tolerance, {counts['mismatch']} mismatched"
        )
        rows.append(report.row(ident, "cache_audit", layer, combined, tol, detail, now))
    return rows
