"""Cross-model parity: the same inputs through two models, compared stage by stage.

Both models decode the same bytes once; each then applies its own pinned preprocessing and runs
through its own batcher (the serving path). Every array is brought to one layout first (channels
last: CHW -> HWC; the input tensors also to RGB order) and compared per layer:
- max absolute difference over all inputs and elements;
- cosine similarity per input (float64, over the flattened array): minimum and mean;
- top-1 agreement on class layers (a vector as long as both models' class count), else -1.

`first_divergence` names the first stage, in model A's pipeline order, whose difference goes
beyond float rounding: "preprocess", a layer, or "". Rounding is judged with the looser of the two
manifests' consistency tolerances (|a - b| <= atol + rtol * max|a| and cosine >= min_cosine), the
same ones that apply to a model run in a changed environment. Cross-framework rounding stays
small (torch vs Keras EfficientNet-Lite0: max |a - b| below 1e-5 of max |a| at every layer); a
real bug (BatchNorm in training mode, a wrong colour order) is orders of magnitude larger.

Text models (`compare_text_models`): tokens instead of input tensors, and retrieval agreement
(top-10 neighbour overlap over a fixed corpus) on vector layers; see `_text_parity`.

Inputs by default: the server's canary set (`_canaries`: real photos and synthetic images).
Layers by default: every layer name both catalogues have with the same shape once in the same
layout. `ParityMonitor` exports the report of configured pairs as metrics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import ExitStack, suppress
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .._errors import EmbedwardenError, InvalidInput, LimitExceeded, ManifestError, NotFound
from .._metrics import METRICS
from ..models import (
    ImageSource,
    LayerSpec,
    Manifest,
    Preprocessor,
    Registry,
    TextInput,
    decode,
    parse_model_ref,
)
from ..serving import InputSource, ItemOutput, LoadedModel, ModelIdentity, ModelManager
from ._canaries import canaries
from ._checks import cosines
from ._text_parity import corpus_tensors, overlaps, retrieval_layers, text_inputs, top_k
from ._tolerance import Tolerance

log = logging.getLogger(__name__)

PREPROCESS = "preprocess"
PAIR_SEPARATOR = ";"


@dataclass(frozen=True)
class LayerParity:
    layer: str
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float  # -1 when the layer is not a class layer
    diverged: bool
    # Text vector layers: mean and least top-10 neighbour overlap over a fixed corpus (else -1).
    retrieval_overlap: float = -1.0
    retrieval_min_overlap: float = -1.0


@dataclass(frozen=True)
class ParityReport:
    model_a: ModelIdentity
    model_b: ModelIdentity
    inputs: int
    preprocess_max_abs_diff: float
    layers: tuple[LayerParity, ...]
    first_divergence: str


# --- array arithmetic ----------------------------------------------------------------------


def channels_last(layout: str) -> str:
    """The common layout: every axis in order, channels moved last ("CHW" -> "HWC")."""
    return layout.replace("C", "") + "C" if "C" in layout else layout


def to_channels_last(batch: np.ndarray, layout: str) -> np.ndarray:
    """[N, *layout] -> [N, *channels_last(layout)]."""
    target = channels_last(layout)
    if target == layout:
        return batch
    order = [0, *(1 + layout.index(axis) for axis in target)]
    return np.ascontiguousarray(batch.transpose(order))


def compare_arrays(
    layer: str, a: np.ndarray, b: np.ndarray, tolerance: Tolerance, classes: bool
) -> LayerParity:
    """Compares two [N, ...] float arrays of the same shape and layout."""
    if a.shape != b.shape:
        raise InvalidInput(f"{layer}: shapes differ: {list(a.shape)} vs {list(b.shape)}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if not math.isfinite(max_abs) or np.isnan(diff).any():
        max_abs = math.inf
    cos = cosines(a, b)
    top1 = -1.0
    if classes:
        top1 = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    scale = float(np.abs(a).max()) if a.size else 0.0
    return LayerParity(
        layer=layer,
        max_abs_diff=max_abs,
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        top1_agreement=top1,
        diverged=tolerance.exceeded(max_abs, scale, float(cos.min())),
    )


def _input_rgb_hwc(tensor: np.ndarray, manifest: Manifest) -> np.ndarray:
    """A preprocessed [N, ...] input in channels-last RGB order, whatever the model takes."""
    spec = manifest.preprocess
    out = to_channels_last(tensor, "CHW" if spec.layout == "NCHW" else "HWC")
    return out[..., ::-1] if spec.color_order == "BGR" else out


# --- which layers --------------------------------------------------------------------------


def _is_class_layer(layer: LayerSpec, manifest: Manifest) -> bool:
    return len(layer.shape) == 1 and layer.shape[0] == manifest.architecture.num_classes


def comparable_layers(
    a: Manifest, b: Manifest, requested: Sequence[str] = ()
) -> list[tuple[LayerSpec, LayerSpec]]:
    """Pairs of catalogue entries to compare, in model A's order.

    Requested layers must exist in both catalogues with the same shape in a common layout;
    without a request, every such layer is taken (others are skipped and logged).
    """
    if len(set(requested)) != len(requested):
        raise InvalidInput(f"layers are repeated: {list(requested)}")
    pairs: list[tuple[LayerSpec, LayerSpec]] = []
    names = list(requested) or [layer.name for layer in a.layers]
    b_names = {layer.name for layer in b.layers}
    skipped: list[str] = []
    for name in names:
        if name not in b_names:
            if requested:
                a.layer(name)  # NotFound naming A's catalogue, if A lacks it too
                raise NotFound(f"layer {name!r} is not in the catalogue of {b.ref}")
            continue
        la, lb = a.layer(name), b.layer(name)
        same = channels_last(la.layout) == channels_last(lb.layout) and sorted(
            zip(la.layout, la.shape, strict=True)
        ) == sorted(zip(lb.layout, lb.shape, strict=True))
        if not same:
            if requested:
                raise InvalidInput(
                    f"layer {name!r} has shape {list(la.shape)} ({la.layout}) in {a.ref} but "
                    f"{list(lb.shape)} ({lb.layout}) in {b.ref}: not comparable"
                )
            skipped.append(name)
            continue
        pairs.append((la, lb))
    if skipped:
        log.info("parity %s vs %s: layers with other shapes skipped: %s", a.ref, b.ref, skipped)
    if not pairs:
        raise InvalidInput(
            f"{a.ref} and {b.ref} have no layer of the same name and shape to compare"
        )
    return pairs


# --- inputs --------------------------------------------------------------------------------


def canary_inputs() -> tuple[ImageSource, ...]:
    """The built-in inputs: the server's canary set (real photos as encoded files, and
    synthetic images that stress resampling and colour handling, as raw arrays)."""
    return tuple(c.source for c in canaries() if not isinstance(c.source, TextInput))


# --- the comparison ------------------------------------------------------------------------


def _run(model: LoadedModel, tensors: list[np.ndarray], layers: list[str]) -> dict[str, np.ndarray]:
    """Every item through the model's own batcher; outputs stacked per layer, input order."""
    futures: list[Future[ItemOutput]] = [model.batcher.submit(t, layers) for t in tensors]
    outputs = [f.result() for f in futures]
    return {layer: np.stack([o.outputs[layer] for o in outputs]) for layer in layers}


def _decode_all(
    sources: Sequence[ImageSource], manifest: Manifest, max_pixels: int
) -> list[Image.Image]:
    images = []
    for i, source in enumerate(sources):
        try:
            images.append(decode(source, max_pixels, *manifest.preprocess.decoding))
        except InvalidInput as exc:
            raise type(exc)(f"inputs[{i}]: {exc}") from None
    return images


def compare_models(
    a: LoadedModel,
    b: LoadedModel,
    sources: Sequence[InputSource] = (),
    layers: Sequence[str] = (),
    *,
    max_pixels: int = 40_000_000,
    max_inputs: int = 256,
) -> ParityReport:
    """Blocking: runs `sources` (default: the canary photos) through both models and compares."""
    ma, mb = a.manifest, b.manifest
    if len(sources) > max_inputs:
        raise LimitExceeded(f"{len(sources)} inputs; a parity report takes at most {max_inputs}")
    if ma.modality != mb.modality:
        raise InvalidInput(f"{ma.ref} takes {ma.modality}s, {mb.ref} {mb.modality}s: no parity")
    pairs = comparable_layers(ma, mb, layers)
    if ma.modality == "text":
        return compare_text_models(a, b, sources, pairs)
    inputs = [s for s in sources if not isinstance(s, TextInput)] or list(canary_inputs())
    if len(inputs) != len(sources) and sources:
        raise InvalidInput("texts sent for a parity report of image models")
    assert isinstance(a.preprocessor, Preprocessor) and isinstance(b.preprocessor, Preprocessor)
    images_a = _decode_all(inputs, ma, max_pixels)
    # Decoding is part of each model's contract: decoded again only where the two differ.
    same = ma.preprocess.decoding == mb.preprocess.decoding
    images_b = images_a if same else _decode_all(inputs, mb, max_pixels)
    tensors_a = [a.preprocessor(image) for image in images_a]
    tensors_b = [b.preprocessor(image) for image in images_b]
    tolerance = Tolerance.between(ma, mb)

    pre_a = _input_rgb_hwc(np.stack(tensors_a), ma)
    pre_b = _input_rgb_hwc(np.stack(tensors_b), mb)
    if pre_a.shape == pre_b.shape:
        pre_diff = float(np.abs(pre_a - pre_b).max())
        pre_diverged = tolerance.exceeded(pre_diff, float(np.abs(pre_a).max()), 1.0)
    else:  # other input sizes: nothing to compare element by element
        pre_diff, pre_diverged = math.inf, True

    with ExitStack() as stack:
        stack.enter_context(a.use())
        stack.enter_context(b.use())
        out_a = _run(a, tensors_a, [la.name for la, _ in pairs])
        out_b = _run(b, tensors_b, [lb.name for _, lb in pairs])

    results = []
    for la, lb in pairs:
        results.append(
            compare_arrays(
                la.name,
                to_channels_last(out_a[la.name], la.layout),
                to_channels_last(out_b[lb.name], lb.layout),
                tolerance,
                classes=_is_class_layer(la, ma) and _is_class_layer(lb, mb),
            )
        )
    first = PREPROCESS if pre_diverged else next((r.layer for r in results if r.diverged), "")
    return ParityReport(
        model_a=a.identity,
        model_b=b.identity,
        inputs=len(inputs),
        preprocess_max_abs_diff=pre_diff,
        layers=tuple(results),
        first_divergence=first,
    )


def compare_text_models(
    a: LoadedModel,
    b: LoadedModel,
    sources: Sequence[InputSource],
    pairs: list[tuple[LayerSpec, LayerSpec]],
) -> ParityReport:
    """Text models: tokens, then layers, then retrieval agreement (see `_text_parity`)."""
    ma, mb = a.manifest, b.manifest
    inputs = text_inputs(sources)
    tensors_a = [a.preprocessor.prepare(t, 0) for t in inputs]
    tensors_b = [b.preprocessor.prepare(t, 0) for t in inputs]
    tolerance = Tolerance.between(ma, mb)
    tokens_a, tokens_b = np.stack(tensors_a), np.stack(tensors_b)
    if tokens_a.shape == tokens_b.shape:
        pre_diff = float(np.abs(tokens_a - tokens_b).max())
    else:  # other max lengths: nothing to compare token by token
        pre_diff = math.inf
    retrieval = retrieval_layers(pairs)
    with ExitStack() as stack:
        stack.enter_context(a.use())
        stack.enter_context(b.use())
        out_a = _run(a, tensors_a, [la.name for la, _ in pairs])
        out_b = _run(b, tensors_b, [lb.name for _, lb in pairs])
        if retrieval:
            corpus_a = _run(a, corpus_tensors(a), retrieval)
            corpus_b = _run(b, corpus_tensors(b), retrieval)
    results = []
    for la, lb in pairs:
        result = compare_arrays(la.name, out_a[la.name], out_b[lb.name], tolerance, False)
        if la.name in retrieval:
            shared = overlaps(
                top_k(out_a[la.name], corpus_a[la.name]),
                top_k(out_b[lb.name], corpus_b[la.name]),
            )
            result = replace(
                result,
                retrieval_overlap=float(shared.mean()),
                retrieval_min_overlap=float(shared.min()),
            )
        results.append(result)
    first = PREPROCESS if pre_diff != 0 else next((r.layer for r in results if r.diverged), "")
    return ParityReport(
        model_a=a.identity,
        model_b=b.identity,
        inputs=len(inputs),
        preprocess_max_abs_diff=pre_diff,
        layers=tuple(results),
        first_divergence=first,
    )


# --- configured pairs, exported as metrics ---------------------------------------------------


def parse_pairs(pairs: Sequence[str], registry: Registry) -> list[tuple[Manifest, Manifest]]:
    """`Settings.parity_pairs` entries "A;B" (NAME[@VERSION] each), resolved now: a typo fails
    the start instead of silently exporting nothing."""
    out = []
    for pair in pairs:
        parts = pair.split(PAIR_SEPARATOR)
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ManifestError(
                f"parity pair {pair!r}: expected 'MODEL_A;MODEL_B' (NAME or NAME@VERSION each; "
                "pairs separated by commas)"
            )
        a, b = (registry.resolve(*parse_model_ref(p)) for p in parts)
        out.append((a, b))
    return out


class ParityMonitor:
    """Compares configured pairs when both are serving: after a load, then every interval.

    One background thread; a comparison is a few photos through each model. Gauges of a pair
    that is no longer fully loaded are removed, so dashboards don't show stale parity.
    """

    def __init__(
        self, models: ModelManager, pairs: list[tuple[Manifest, Manifest]], interval_s: float
    ) -> None:
        self.models = models
        self.pairs = pairs
        self.interval_s = max(1.0, interval_s)
        self.max_pixels = models.settings.max_image_pixels
        self.last: dict[tuple[str, str], ParityReport] = {}
        self._labels: dict[tuple[str, str], set[str]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="parity", daemon=True)
        models.on_change.append(self._on_change)
        self._thread.start()

    def _on_change(self, event: str, model: LoadedModel | None) -> None:
        if event in ("loaded", "unloaded", "failed"):
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _serving(self, manifest: Manifest) -> LoadedModel | None:
        for model in self.models.loaded():
            if model.manifest.ref == manifest.ref:
                return model
        return None

    def run_once(self) -> None:
        for ma, mb in self.pairs:
            key = (ma.ref, mb.ref)
            a, b = self._serving(ma), self._serving(mb)
            if a is None or b is None:
                self._forget(key)
                continue
            started = time.perf_counter()
            try:
                report = compare_models(a, b, max_pixels=self.max_pixels)
            except EmbedwardenError as exc:  # e.g. unloaded meanwhile
                log.warning("parity %s vs %s not measured: %s", *key, exc)
                self._forget(key)
                continue
            except Exception:
                log.exception("parity %s vs %s failed", *key)
                self._forget(key)
                continue
            self._export(key, report)
            log.info(
                "parity %s vs %s: first divergence %r (%.2fs)",
                *key,
                report.first_divergence,
                time.perf_counter() - started,
            )

    def _export(self, key: tuple[str, str], report: ParityReport) -> None:
        self.last[key] = report
        labels = self._labels.setdefault(key, set())
        METRICS.parity_max_abs_diff.labels(*key, PREPROCESS).set(report.preprocess_max_abs_diff)
        labels.add(PREPROCESS)
        for layer in report.layers:
            METRICS.parity_max_abs_diff.labels(*key, layer.layer).set(layer.max_abs_diff)
            METRICS.parity_min_cosine.labels(*key, layer.layer).set(layer.min_cosine)
            if layer.top1_agreement >= 0:
                METRICS.parity_top1_agreement.labels(*key, layer.layer).set(layer.top1_agreement)
            labels.add(layer.layer)

    def _forget(self, key: tuple[str, str]) -> None:
        self.last.pop(key, None)
        for layer in self._labels.pop(key, set()):
            for gauge in (
                METRICS.parity_max_abs_diff,
                METRICS.parity_min_cosine,
                METRICS.parity_top1_agreement,
            ):
                with suppress(KeyError):  # never set (e.g. top-1 of a feature layer)
                    gauge.remove(*key, layer)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)
