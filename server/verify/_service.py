"""The Verify use case: the user's pipeline sent (input, vector) pairs; compute the reference
through the normal extraction path (cache included), judge each vector, and for failing ones
try the catalogue of known mistakes to name what the pipeline does differently.

All of it runs as background work of the model's batcher (see serving/_batching): it yields to
Extract requests, so a large verification slows nobody. Diagnosis is bounded per request by an
item count and a time budget; the answer says which items were skipped for budget.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from PIL import Image

from .._errors import InvalidInput, NotFound
from .._metrics import METRICS
from .._settings import Settings
from ..consistency import Tolerance
from ..models import (
    DecodeSpec,
    ImageSource,
    LayerSpec,
    Pooling,
    TextInput,
    decode,
    finish,
    resolve_pooling,
)
from ..serving import (
    BACKGROUND_CHUNK,
    CacheMode,
    ExtractionService,
    ExtractOptions,
    InputSource,
    LoadedModel,
    ModelIdentity,
)
from . import _catalogue as catalogue
from ._compare import ItemComparison, Verdict, compare_item, cosine, worst

log = logging.getLogger(__name__)

PIPELINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
DEFAULT_PIPELINE = "default"
OTHER_PIPELINES = "_other"  # label for pipelines beyond the bounded set
REPORTED_MATCHES = 3
COMBINED_FROM = 3  # pairs among this many best single mistakes are tried
VECTOR_DTYPES = ("float32", "float16")


class DiagnosisState(StrEnum):
    NOT_NEEDED = "not_needed"  # the item did not fail
    DONE = "done"
    SKIPPED_BUDGET = "skipped_budget"
    NOT_REQUESTED = "not_requested"


@dataclass(frozen=True)
class VerifyOptions:
    layer: str = ""  # empty: the model's default layer
    pooling: Pooling = Pooling.DEFAULT
    normalize: bool = False
    pipeline: str = ""
    cache: CacheMode = CacheMode.ON
    diagnose: bool = True


@dataclass(frozen=True)
class MistakeMatch:
    mistake: str  # a catalogue name, or two joined by "+"
    cosine: float
    reproduces: bool  # cosine >= the manifest's min_cosine


@dataclass
class VerifiedItem:
    comparison: ItemComparison
    cached: bool
    diagnosis_state: DiagnosisState
    diagnosis: list[MistakeMatch] = field(default_factory=list)


@dataclass
class VerifyResult:
    identity: ModelIdentity
    layer: str
    pooling: Pooling
    pipeline: str
    verdict: Verdict
    tolerance: str
    items: list[VerifiedItem]
    catalogue: list[str]
    diagnosis_seconds: float

    @property
    def failed(self) -> int:
        return sum(item.comparison.verdict is Verdict.FAIL for item in self.items)

    @property
    def min_cosine(self) -> float:
        return min((item.comparison.cosine for item in self.items), default=1.0)


@dataclass(frozen=True)
class _Target:
    """What the submitted vectors claim to be."""

    model: LoadedModel
    layer: LayerSpec
    pooling: Pooling
    dtype: str
    normalize: bool

    def finish(self, output: np.ndarray) -> np.ndarray:
        return finish(output, self.layer, self.pooling, self.normalize, self.dtype)


class PipelineLabels:
    """Bounds the `pipeline` label's values: names beyond the first `limit` share one label."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._warned = False

    def label(self, pipeline: str) -> str:
        name = pipeline or DEFAULT_PIPELINE
        if not PIPELINE_RE.match(name):
            raise InvalidInput(
                f"pipeline {pipeline!r}: use letters, digits and _.:/- (at most 64 characters, "
                "starting with a letter or digit)"
            )
        with self._lock:
            if name in self._seen:
                return name
            if len(self._seen) < self.limit:
                self._seen.add(name)
                return name
            if not self._warned:
                self._warned = True
                log.warning(
                    "more than %d pipeline names verified; further ones are counted as %r",
                    self.limit,
                    OTHER_PIPELINES,
                )
        return OTHER_PIPELINES


class VerificationService:
    def __init__(
        self, extraction: ExtractionService, settings: Settings, executor: Executor
    ) -> None:
        self.extraction = extraction
        self.models = extraction.models
        self.settings = settings
        self.executor = executor
        self.pipelines = PipelineLabels(settings.verify_max_pipelines)

    async def verify(
        self,
        name: str,
        version: str,
        inputs: Sequence[InputSource],
        vectors: Sequence[np.ndarray],
        options: VerifyOptions,
    ) -> VerifyResult:
        sources = [s for s in inputs if not isinstance(s, TextInput)]
        if len(sources) != len(inputs):
            raise InvalidInput(
                "Verify judges image pipelines (its catalogue of mistakes is about decoding and "
                "preprocessing images); text inputs are not supported"
            )
        pipeline = self.pipelines.label(options.pipeline)
        if len(vectors) != len(sources):
            raise InvalidInput(
                f"{len(vectors)} vectors for {len(sources)} inputs: send one vector per input, "
                "in input order"
            )
        model = self.models.get(name, version)
        with model.use():
            target = self._target(model, options, vectors)
            extracted = await self.extraction.extract(
                name,
                model.identity.version,
                sources,
                ExtractOptions(
                    layers=(target.layer.name,),
                    pooling=target.pooling,
                    dtype=target.dtype,
                    normalize=target.normalize,
                    cache=options.cache,
                    background=True,
                ),
            )
            tolerance = Tolerance.of(model.manifest)
            classes = _is_class_layer(model, target)
            items = [
                VerifiedItem(
                    compare_item(vector, row[0].array, tolerance, classes),
                    row[0].cached,
                    DiagnosisState.NOT_NEEDED,
                )
                for vector, row in zip(vectors, extracted.items, strict=True)
            ]
            started = time.monotonic()
            await self._diagnose_all(target, sources, vectors, items, options.diagnose)
            seconds = time.monotonic() - started
        result = VerifyResult(
            identity=model.identity,
            layer=target.layer.name,
            pooling=target.pooling,
            pipeline=pipeline,
            verdict=worst([item.comparison.verdict for item in items]),
            tolerance=tolerance.describe(),
            items=items,
            catalogue=catalogue.names(),
            diagnosis_seconds=seconds,
        )
        _record_metrics(result)
        return result

    def _target(
        self, model: LoadedModel, options: VerifyOptions, vectors: Sequence[np.ndarray]
    ) -> _Target:
        manifest = model.manifest
        try:
            layer = manifest.layer(options.layer or manifest.default_layer)
        except NotFound as exc:
            raise InvalidInput(str(exc)) from None
        pooling = resolve_pooling(layer, options.pooling)
        shape = finish(np.zeros(layer.shape, np.float32), layer, pooling, False, "float32").shape
        dtypes = {str(v.dtype) for v in vectors}
        if not dtypes <= set(VECTOR_DTYPES) or len(dtypes) > 1:
            raise InvalidInput(
                f"vectors have dtypes {sorted(dtypes)}: send float32 or float16, the same for all"
            )
        for i, vector in enumerate(vectors):
            if vector.shape != shape:
                raise InvalidInput(
                    f"vectors[{i}] has shape {list(vector.shape)}; layer {layer.name!r} of "
                    f"{manifest.ref} pooled {pooling.value!r} gives shape {list(shape)}"
                )
            if not np.isfinite(vector).all():
                raise InvalidInput(f"vectors[{i}] holds NaN or Inf values")
        dtype = dtypes.pop() if dtypes else "float32"
        return _Target(model, layer, pooling, dtype, options.normalize)

    async def _diagnose_all(
        self,
        target: _Target,
        sources: Sequence[ImageSource],
        vectors: Sequence[np.ndarray],
        items: list[VerifiedItem],
        requested: bool,
    ) -> None:
        budget_items = self.settings.verify_diagnosis_items
        deadline = time.monotonic() + self.settings.verify_diagnosis_seconds
        done = 0
        for i, item in enumerate(items):
            if item.comparison.verdict is not Verdict.FAIL:
                continue
            if not requested:
                item.diagnosis_state = DiagnosisState.NOT_REQUESTED
            elif done >= budget_items or time.monotonic() >= deadline:
                item.diagnosis_state = DiagnosisState.SKIPPED_BUDGET
            else:
                item.diagnosis = await self._diagnose(target, sources[i], vectors[i])
                item.diagnosis_state = DiagnosisState.DONE
                done += 1

    async def _diagnose(
        self, target: _Target, source: ImageSource, submitted: np.ndarray
    ) -> list[MistakeMatch]:
        """The catalogued mistakes ranked by how well they reproduce `submitted`."""
        reference = catalogue.reference(target.model.manifest.preprocess)
        singles = catalogue.applicable(reference, source)
        images: dict[tuple[DecodeSpec, str], Image.Image | None] = {}  # decoded once each
        scores = await self._score(target, source, submitted, singles, images)
        min_cosine = target.model.manifest.consistency.min_cosine
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        if not ranked or ranked[0][1] < min_cosine:
            best = [name for name, _ in ranked[:COMBINED_FROM]]
            pairs = []
            for a_i, a in enumerate(best):
                for b in best[a_i + 1 :]:
                    combined = catalogue.combine(reference, a, b)
                    if combined is not None:
                        pairs.append((f"{a}{catalogue.COMBINATION}{b}", combined))
            scores.update(await self._score(target, source, submitted, pairs, images))
            ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        return [MistakeMatch(n, c, c >= min_cosine) for n, c in ranked[:REPORTED_MATCHES]]

    async def _score(
        self,
        target: _Target,
        source: ImageSource,
        submitted: np.ndarray,
        recipes: list[tuple[str, catalogue.Recipe]],
        images: dict[tuple[DecodeSpec, str], Image.Image | None],
    ) -> dict[str, float]:
        """Cosine to `submitted` of each recipe's vector. `images` holds `source` decoded per
        decode contract (None: it does not decode so), filled as needed."""
        loop = asyncio.get_running_loop()
        max_pixels = self.settings.max_image_pixels

        def decode_for(recipe: catalogue.Recipe) -> Image.Image | None:
            try:
                return decode(source, max_pixels, *recipe.spec.decoding)
            except InvalidInput:  # this pipeline's decoder refuses the file: no such mistake
                return None

        def render(recipe: catalogue.Recipe) -> np.ndarray | None:
            image = images[recipe.spec.decoding]
            try:
                return None if image is None else catalogue.render(recipe, image)
            except InvalidInput:  # e.g. too small for this geometry: the mistake can't apply
                return None

        batcher = target.model.batcher
        layer = [target.layer.name]
        scores: dict[str, float] = {}
        # A few recipes at a time, slots first (as every request takes them): background work
        # never holds the decode pool or the queue far ahead of foreground requests.
        for start in range(0, len(recipes), BACKGROUND_CHUNK):
            chunk = recipes[start : start + BACKGROUND_CHUNK]
            with batcher.reserve(len(chunk), background=True):
                todo = {r.spec.decoding: r for _, r in chunk if r.spec.decoding not in images}
                decoded = await asyncio.gather(
                    *(loop.run_in_executor(self.executor, decode_for, r) for r in todo.values())
                )
                images.update(zip(todo, decoded, strict=True))
                rendered = await asyncio.gather(
                    *(loop.run_in_executor(self.executor, render, recipe) for _, recipe in chunk)
                )
                named = [(n, t) for (n, _), t in zip(chunk, rendered, strict=True) if t is not None]
                futures = [batcher.submit(t, layer, background=True) for _, t in named]
                outputs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            for (name, _), out in zip(named, outputs, strict=True):
                scores[name] = cosine(target.finish(out.outputs[target.layer.name]), submitted)
        return scores


def _is_class_layer(model: LoadedModel, target: _Target) -> bool:
    """A per-class score vector (logits): top-1/top-5 agreement means something there."""
    classes = model.manifest.architecture.num_classes
    return target.layer.layout == "C" and target.layer.shape == (classes,)


def _record_metrics(result: VerifyResult) -> None:
    ident = result.identity
    labels = (ident.name, ident.version, result.layer, result.pipeline)
    counts: dict[Verdict, int] = {}
    for item in result.items:
        counts[item.comparison.verdict] = counts.get(item.comparison.verdict, 0) + 1
    for verdict, count in counts.items():
        METRICS.verify_items.labels(*labels, verdict.value).inc(count)
    METRICS.verify_min_cosine.labels(*labels).set(result.min_cosine)
    for item in result.items:
        if item.diagnosis_state is DiagnosisState.DONE:
            best = item.diagnosis[0] if item.diagnosis else None
            mistake = best.mistake if best is not None and best.reproduces else "unknown"
            METRICS.verify_diagnosis.labels(result.pipeline, mistake).inc()
        elif item.diagnosis_state is DiagnosisState.SKIPPED_BUDGET:
            METRICS.verify_diagnosis_skipped.labels(result.pipeline).inc()
