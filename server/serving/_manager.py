"""Loaded model versions: load (verify, build, warm up, check), serve, unload.

A model is SERVING only after its weights verified, every catalogued layer produced its pinned
shape on warm-up, no submodule is in training mode, and every `before_serving` hook (the restart
consistency check) passed. Unloading stops new requests, lets in-flight ones finish, then frees.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from .._errors import (
    ConsistencyFailure,
    EmbedwardenError,
    FailedPrecondition,
    InternalFault,
    InvalidInput,
    ManifestError,
    NotFound,
    Unavailable,
)
from .._frameworks import available_cores
from .._metrics import METRICS
from .._settings import Settings
from ..backbones import Backbone, load_backbone
from ..models import (
    Manifest,
    Preprocessor,
    Registry,
    TextPreprocessor,
    VerifiedWeights,
    check_fingerprint,
    parse_fingerprint,
    parse_model_ref,
    require_decoder,
)
from ._batching import DynamicBatcher
from ._widening import WidePasses

log = logging.getLogger(__name__)


def parse_pins(specs: Sequence[str], registry: Registry) -> dict[tuple[str, str], str]:
    """`--require-fingerprint NAME@VERSION=HEX` values by (name, version). A pin must name a
    registered version explicitly (a default version may change under it)."""
    pins: dict[tuple[str, str], str] = {}
    for spec in specs:
        ref, sep, hex_digits = spec.partition("=")
        name, version = parse_model_ref(ref) if sep else ("", "")
        if not version:
            raise InvalidInput(
                f"--require-fingerprint {spec!r}: expected NAME@VERSION=HEX (64 hex digits)"
            )
        registry.resolve(name, version)  # NotFound for a typo, before anything loads
        fingerprint = parse_fingerprint(hex_digits, f"--require-fingerprint {ref}")
        if pins.setdefault((name, version), fingerprint) != fingerprint:
            raise InvalidInput(f"--require-fingerprint: {ref} is pinned to two fingerprints")
    return pins


class ModelState(StrEnum):
    AVAILABLE = "available"
    LOADING = "loading"
    SERVING = "serving"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    fingerprint: str
    weights_sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def of(cls, manifest: Manifest) -> ModelIdentity:
        return cls(manifest.name, manifest.version, manifest.fingerprint(), manifest.weights.sha256)


@dataclass
class LoadedModel:
    manifest: Manifest
    identity: ModelIdentity
    backbone: Backbone
    preprocessor: Preprocessor | TextPreprocessor
    weights: VerifiedWeights
    device: str
    batcher: DynamicBatcher = field(init=False)
    passes: WidePasses = field(init=False)
    load_seconds: float = 0.0
    after_batch: list[Callable[[LoadedModel, int], None]] = field(default_factory=list)
    _inflight: int = 0
    _accepting: bool = True
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def run_batch(
        self, batch: np.ndarray, layers: Sequence[str], wide: bool
    ) -> dict[str, np.ndarray]:
        outputs = self.passes.run(batch, layers, wide)
        for hook in self.after_batch:
            hook(self, len(batch))
        return outputs

    @contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Holds the model for one request; unload waits until every holder is done."""
        with self._cond:
            if not self._accepting:
                raise Unavailable(f"model {self.identity.ref} is unloading")
            self._inflight += 1
        try:
            yield self
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def drain(self, timeout: float | None) -> bool:
        with self._cond:
            self._accepting = False
            return self._cond.wait_for(lambda: self._inflight == 0, timeout)


@dataclass
class _Entry:
    state: ModelState
    detail: str = ""
    model: LoadedModel | None = None


Hook = Callable[[LoadedModel], None]


class ModelManager:
    """Owns every loaded model. Loads run on the caller's thread; state is visible meanwhile."""

    def __init__(self, registry: Registry, settings: Settings, device: str) -> None:
        self.registry = registry
        self.settings = settings
        self.device = device
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time: loads compete for memory
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.pins = parse_pins(settings.require_fingerprints, registry)
        self.before_serving: list[Hook] = []  # may raise ConsistencyFailure
        self.after_batch: list[Callable[[LoadedModel, int], None]] = []
        self.on_change: list[Callable[[str, LoadedModel | None], None]] = []

    # --- queries -----------------------------------------------------------------------

    def state(self, manifest: Manifest) -> tuple[ModelState, str]:
        with self._lock:
            entry = self._entries.get((manifest.name, manifest.version))
            return (entry.state, entry.detail) if entry else (ModelState.AVAILABLE, "")

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [
                e.model
                for e in self._entries.values()
                if e.model is not None and e.state is ModelState.SERVING
            ]

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The serving model for name[@version]; clear errors for every other state."""
        manifest = self.registry.resolve(name, version)
        with self._lock:
            entry = self._entries.get((manifest.name, manifest.version))
        if entry is None or entry.state is ModelState.AVAILABLE:
            raise FailedPrecondition(
                f"model {manifest.ref} is registered but not loaded; load it with "
                f"`embedwarden load {manifest.ref}` or start the server with --models"
            )
        if entry.state is ModelState.LOADING:
            raise Unavailable(f"model {manifest.ref} is still loading; retry shortly")
        if entry.state is ModelState.FAILED or entry.model is None:
            raise FailedPrecondition(f"model {manifest.ref} failed to load: {entry.detail}")
        return entry.model

    # --- lifecycle ---------------------------------------------------------------------

    def load(self, name: str, version: str = "") -> LoadedModel:
        manifest = self.registry.resolve(name, version)
        key = (manifest.name, manifest.version)
        with self._lock:
            entry = self._entries.get(key)
            if entry and entry.state is ModelState.SERVING and entry.model:
                return entry.model
            self._entries[key] = _Entry(ModelState.LOADING)
        self._notify("loading", None)
        try:
            with self._load_lock:
                model = self._build(manifest)
        except EmbedwardenError as exc:
            self._fail(key, str(exc))
            raise
        except Exception as exc:  # a bug, not the manifest's or the files' fault: INTERNAL
            log.exception("loading %s failed", manifest.ref)
            detail = (
                f"internal error ({type(exc).__name__}) while loading; the server log has the "
                "traceback"
            )
            self._fail(key, detail)
            raise InternalFault(detail) from exc
        with self._lock:
            self._entries[key] = _Entry(ModelState.SERVING, "", model)
        METRICS.model_serving.labels(manifest.name, manifest.version).set(1)
        METRICS.model_load_seconds.labels(manifest.name, manifest.version).set(model.load_seconds)
        log.info(
            "%s serving on %s (loaded in %.2fs, fingerprint %s)",
            manifest.ref,
            self.device,
            model.load_seconds,
            model.identity.fingerprint[:16],
        )
        self._notify("loaded", model)
        return model

    def _fail(self, key: tuple[str, str], detail: str) -> None:
        with self._lock:
            self._entries[key] = _Entry(ModelState.FAILED, detail)
        METRICS.model_serving.labels(*key).set(0)
        log.error("model %s@%s not serving: %s", key[0], key[1], detail)
        self._notify("failed", None)

    def _build(self, manifest: Manifest) -> LoadedModel:
        started = time.perf_counter()
        pinned = self.pins.get((manifest.name, manifest.version))
        if pinned is not None:  # before the weights are read: the manifest decides it
            check_fingerprint(manifest, pinned, "--require-fingerprint pins")
        if manifest.numerics.deterministic and not self.settings.deterministic:
            raise FailedPrecondition(
                f"{manifest.ref} pins deterministic numerics but the server runs with "
                "--deterministic false"
            )
        # Before the weights: a decoder this machine lacks (nvjpeg without CUDA) refuses the
        # version; decoding with another library would serve other pixels under its fingerprint.
        require_decoder(manifest.preprocess.decoder, manifest.ref)
        backbone, verified = load_backbone(manifest, self.device, self.settings.weights_dirs)
        model = LoadedModel(
            manifest=manifest,
            identity=ModelIdentity.of(manifest),
            backbone=backbone,
            preprocessor=_preprocessor(backbone, manifest),
            weights=verified,
            device=self.device,
            after_batch=self.after_batch,
        )
        try:
            self._warm_up(model)
            model.passes = self._wide_passes(model)
            model.batcher = DynamicBatcher(
                manifest.ref,
                model.run_batch,
                max_batch_size=self.settings.max_batch_size,
                max_queue_delay_s=self.settings.max_queue_delay_ms / 1000.0,
                max_queue_items=self.settings.max_queue_items,
                workers=self.settings.inference_lanes,
                on_batch=lambda n, _s: METRICS.batch_size.labels(
                    manifest.name, manifest.version
                ).observe(n),
                on_depth=METRICS.depth_setter(
                    manifest.name, manifest.version, model.identity.fingerprint
                ),
                widen=model.passes.threads > 0,
            )
            model.load_seconds = time.perf_counter() - started
            for hook in self.before_serving:
                hook(model)
        except BaseException:
            if hasattr(model, "batcher"):
                model.batcher.close()
            backbone.close()
            raise
        model.load_seconds = time.perf_counter() - started
        return model

    def _wide_passes(self, model: LoadedModel) -> WidePasses:
        """A model runs lone batches wide on CPU, with several lanes, where its backbone sets
        its thread count per pass (otherwise its WidePasses has 0 wide threads)."""
        settings = self.settings
        threads = min(available_cores(), settings.inference_lanes * settings.torch_threads)
        allowed = (
            settings.wide_idle_passes
            and model.device == "cpu"
            and model.backbone.adapts_threads
            and settings.inference_lanes > 1
            and threads > settings.torch_threads
        )
        name, version = model.manifest.name, model.manifest.version
        wide_batches = METRICS.wide_batches.labels(name, version)

        def on_check(identical: bool) -> None:
            result = "identical" if identical else "different"
            METRICS.wide_shape_checks.labels(name, version, result).inc()

        return WidePasses(model.backbone, threads if allowed else 0, on_check, wide_batches.inc)

    def _warm_up(self, model: LoadedModel) -> None:
        """One pass over every catalogued layer; shapes must match the catalogue exactly."""
        manifest = model.manifest
        if isinstance(model.preprocessor, TextPreprocessor):
            tensor = model.preprocessor.tokens(["Warm-up: one short sentence."])[0]
        else:
            size = manifest.preprocess.size
            rng = np.random.default_rng(0)
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            tensor = model.preprocessor.to_tensor(pixels)
        outputs = model.backbone.infer(tensor[None], [layer.name for layer in manifest.layers])
        for layer in manifest.layers:
            got = tuple(outputs[layer.name].shape[1:])
            if got != layer.shape:
                raise ManifestError(
                    f"{manifest.ref}: layer {layer.name!r} produced shape {list(got)}, the "
                    f"catalogue pins {list(layer.shape)}"
                )
            if not np.isfinite(outputs[layer.name]).all():
                raise ConsistencyFailure(f"{manifest.ref}: layer {layer.name!r} produced NaN/inf")
        training = model.backbone.training_modules()
        if training:
            raise ConsistencyFailure(
                f"{manifest.ref}: modules in training mode after load: {training[:5]}"
            )

    def unload(self, name: str, version: str = "", timeout: float | None = None) -> ModelIdentity:
        manifest = self.registry.resolve(name, version)
        key = (manifest.name, manifest.version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.model is None:
                if entry is not None and entry.state is ModelState.FAILED:
                    del self._entries[key]
                    return ModelIdentity.of(manifest)
                raise NotFound(f"model {manifest.ref} is not loaded")
            model = entry.model
            entry.state = ModelState.LOADING
            entry.detail = "unloading"
        model.drain(timeout)
        model.batcher.close()
        model.backbone.close()
        with self._lock:
            self._entries.pop(key, None)
        METRICS.forget_model(manifest.name, manifest.version, model.identity.fingerprint)
        log.info("%s unloaded", manifest.ref)
        self._notify("unloaded", model)
        return model.identity

    def close(self) -> None:
        for model in self.loaded():
            self.unload(model.manifest.name, model.manifest.version, timeout=5.0)

    def _notify(self, event: str, model: LoadedModel | None) -> None:
        for listener in self.on_change:
            try:
                listener(event, model)
            except Exception:
                log.exception("model listener failed on %s", event)


def _preprocessor(backbone: Backbone, manifest: Manifest) -> Preprocessor | TextPreprocessor:
    """Text backbones bring their verified tokenizer; images follow [preprocess]."""
    text = getattr(backbone, "preprocessor", None)
    return text if isinstance(text, TextPreprocessor) else Preprocessor(manifest.preprocess)


def model_folder(root: Path, identity: ModelIdentity) -> Path:
    """Per-version folder under a data directory, named so that operators can read it."""
    return root / f"{identity.name}@{identity.version}-{identity.fingerprint[:16]}"
