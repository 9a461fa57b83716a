"""Cache audit: recomputes sampled cache hits off the request path and compares them with the
cached arrays.

A hit's vector was computed inside whatever batch the dynamic batcher formed then; the audit
recomputes it alone. Results: `match` (bit-identical), `within_tolerance` (differs by batch
rounding only, within the manifest's tolerance) or `mismatch` (counted, logged, and the entry
overwritten with the recomputed vector when the cache is known).
"""

from __future__ import annotations

import logging
import math
import time

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
