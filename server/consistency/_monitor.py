"""The consistency monitor: proves, continuously, that each model version computes what its
golden record says, and exports every check as Prometheus metrics.

Checks (the `check` label; `layer` is empty for checks that are not per layer):
- weights: the weights file's full SHA-256 (verified by the loader, which refuses a mismatch);
  the in-memory checksum of every parameter and buffer after warm-up, equal to the golden one;
  re-taken after sampled inference batches: any change is a mutation (counted) and fails.
- training_mode: no submodule may be in training mode (BatchNorm would use batch statistics
  and update its running statistics at every request).
- preprocess: the SHA-256 of every preprocessed canary tensor equals the golden one. Always
  exact: preprocessing is integer and table arithmetic, there is no rounding to excuse.
- restart: at every load, before the model is SERVING, the canaries are embedded and compared
  with the golden record, per layer. Exact when the environment is the recorded one, else the
  manifest's [consistency] tolerance; the environment fields that changed are reported.
- coload: the same comparison, re-run whenever another model is loaded or unloaded (or a load
  fails), periodically and on demand: a model's numbers must not depend on its neighbours.
- batch: each canary inside one full batch (max_batch_size, the rest other images) against the
  same canary alone. Never exact (batch composition moves results by rounding); judged by the
  manifest tolerance, which passes rounding (~1e-5) and fails a BatchNorm-in-training bug
  (~1e-1).
- cache_audit: a fraction of served cache hits is recomputed off the request path and compared
  with the cached array: bit-identical (match), within the batch tolerance (the entry was
  computed inside a batch), or a mismatch (counted, and the entry is overwritten).
- flags: process-wide numeric flags (info metric); a change while running is counted and fails.

A failure of weights, training_mode, preprocess or restart at load keeps the model NOT_SERVING
(`ConsistencyFailure`), unless `--consistency-warn-only`. Checks after load report and alert;
they do not take a model out of service.

Work happens on the loading thread (load-time checks), on one background thread (everything
else, including periodic re-checks every `check_interval_s`) or on the caller's thread (the
CheckConsistency RPC); canary runs are serialised. The inference thread only counts batches.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._errors import ConsistencyFailure, FailedPrecondition, Overloaded, Unavailable
from .._metrics import METRICS
from .._settings import Settings
from ..models import Registry
from ..serving import CacheHit, EmbeddingCache, LoadedModel, ModelIdentity, ModelManager, ModelState
from . import _report as report
from ._audit import AuditQueue, audit_hits
from ._canaries import CANARY_SET_VERSION, canaries
from ._checks import (
    CanaryPass,
    Diff,
    GoldenComparison,
    batch_check,
    batch_layers,
    compare_golden,
    run_canaries,
)
from ._flags import FlagWatch
from ._golden import (
    CanaryEmbeddings,
    GoldenRecord,
    GoldenStore,
    env_changes,
    environment,
    manifest_changes,
)
from ._report import NAN, STRICT, Outcome, Report
from ._tolerance import Tolerance
from ._worker import Worker

log = logging.getLogger(__name__)

GATING = ("weights", "training_mode", "preprocess", "restart")
WEIGHTS_COST_FACTOR = 100.0  # sampled checksums use at most ~1% of one core
MIN_WEIGHTS_INTERVAL_S = 1.0


@dataclass
class _Watch:
    """What the monitor knows about one model version that is loading, serving or failed."""

    identity: ModelIdentity
    model: LoadedModel
    reference_checksum: str
    checksum_seconds: float
    golden: GoldenRecord | None = None  # None: no usable record of this fingerprint
    state: str = "checking"  # checking -> serving | failed
    last_checksum: str = ""
    last_weights_at: float = field(default_factory=time.monotonic)
    weights_pending: bool = False
    mutations: int = 0
    results: dict[tuple[str, str], Outcome] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.identity.name, self.identity.version)


def _hold(stack: ExitStack, model: LoadedModel) -> bool:
    """Holds the model like a request does (unload waits); False when it is unloading."""
    try:
        stack.enter_context(model.use())
    except Unavailable:
        return False
    return True


class ConsistencyMonitor:
    """Owns the golden store, the checks' state and their metrics. `attach` hooks it into the
    model manager (before_serving, after_batch, on_change); `audits` is extraction's cache
    auditor."""

    def __init__(
        self,
        settings: Settings,
        models: ModelManager,
        registry: Registry,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.registry = registry
        self.cache = cache
        shipped = settings.shipped_golden_dir
        self.store = GoldenStore(shipped or settings.golden_dir, read_only=shipped is not None)
        self.weights_sample_interval_s: float | None = None  # None: adaptive (~1% of a core)
        self._lock = threading.RLock()
        self._run_lock = threading.Lock()  # one canary run at a time: they compete for cores
        self._on_demand = threading.BoundedSemaphore(2)  # CheckConsistency: 1 running, 1 waiting
        self._watches: dict[tuple[str, str], _Watch] = {}
        # Extraction's cache auditor: sampled hits are recomputed on this monitor's thread.
        self.audits = AuditQueue(
            settings.cache_audit_fraction,
            settings.cache_audit_max_per_s,
            wake=lambda: self._worker.submit("audit", self._run_audits),
        )
        self._flags = FlagWatch()
        self._worker = Worker(settings.check_interval_s, self._periodic)

    def attach(self) -> None:
        self.models.before_serving.append(self.before_serving)
        self.models.after_batch.append(self.after_batch)
        self.models.on_change.append(self.on_change)
        self._worker.start()

    def close(self) -> None:
        self._worker.close()

    # --- hooks -------------------------------------------------------------------------

    def before_serving(self, model: LoadedModel) -> None:
        """The load-time checks; raises ConsistencyFailure unless warn-only."""
        with self._run_lock:
            watch = self._check_at_load(model)
        failed = [o for o in watch.results.values() if o.check in GATING and not o.passed]
        failed = [o for o in failed if o.layer == ""] or failed
        if not failed:
            return
        reasons = "; ".join(f"{o.check}: {o.detail}" for o in failed[:3])
        message = f"{model.identity.ref} failed its consistency checks at load: {reasons}"
        if self.settings.consistency_warn_only:
            log.warning("%s (serving anyway: --consistency-warn-only)", message)
            return
        with self._lock:
            watch.state = "failed"
        raise ConsistencyFailure(message + " (details: `embedwarden check`)")

    def after_batch(self, model: LoadedModel, items: int) -> None:
        """On the inference thread: a dictionary lookup and a clock read, nothing more."""
        watch = self._watches.get((model.identity.name, model.identity.version))
        if watch is None or watch.weights_pending or watch.model is not model:
            return
        interval = self.weights_sample_interval_s
        if interval is None:
            interval = max(MIN_WEIGHTS_INTERVAL_S, WEIGHTS_COST_FACTOR * watch.checksum_seconds)
        if time.monotonic() - watch.last_weights_at >= interval:
            watch.weights_pending = True
            self._worker.submit(("weights", watch.key), lambda: self._sample_weights(watch))

    def on_change(self, event: str, model: LoadedModel | None) -> None:
        if event == "loaded" and model is not None:
            with self._lock:
                watch = self._watches.get((model.identity.name, model.identity.version))
                if watch is not None and watch.model is model:
                    watch.state = "serving"
            self._schedule_coload(exclude=model)
        elif event == "unloaded" and model is not None:
            self._forget(model)
            self._schedule_coload()
        elif event == "failed":
            with self._lock:
                for watch in self._watches.values():
                    state, _ = self.models.state(watch.model.manifest)
                    if watch.state == "checking" and state is ModelState.FAILED:
                        watch.state = "failed"
            self._schedule_coload()  # a loader that failed half-way may have changed globals

    # --- on demand ---------------------------------------------------------------------

    def check(self, name: str = "", version: str = "") -> Report:
        """Runs the checks now on one model (or every loaded one) and returns the report, with
        the restart rows of the last load and the rows of the last cache audit. Models whose
        load failed a consistency check are reported with their load-time results.

        Raises Overloaded when two on-demand checks are already running or waiting: a check
        costs seconds of CPU, and callers must not be able to queue them without bound."""
        if not self._on_demand.acquire(blocking=False):
            raise Overloaded(
                "consistency checks are already running on this server; retry when they finish"
            )
        try:
            return self._check(name, version)
        finally:
            self._on_demand.release()

    def _check(self, name: str, version: str) -> Report:
        self._prune_failed()
        with self._lock:
            if name:
                manifest = self.registry.resolve(name, version)
                watch = self._watches.get((manifest.name, manifest.version))
                if watch is None:
                    raise FailedPrecondition(f"model {manifest.ref} is not loaded; load it first")
                watches = [watch]
            else:
                watches = sorted(self._watches.values(), key=lambda w: w.key)
        for watch in watches:
            if watch.state == "serving":
                self._full_check(watch)
        rows = [o for watch in watches for o in self.results(*watch.key)]
        return Report(all(o.passed for o in rows), rows)

    def check_flags(self) -> None:
        """Compares the process flags with the last look (cheap; also run with every
        co-load, periodic and on-demand check) and updates every model's flags row."""
        with self._lock:
            watches = [w for w in self._watches.values() if w.state != "failed"]
        now = time.time()
        for watch in watches:
            self._publish(watch, [self._flags_row(watch.identity, now)])

    def results(self, name: str, version: str) -> list[Outcome]:
        """The latest row of every check of one model version (empty if unknown)."""
        with self._lock:
            watch = self._watches.get((name, version))
            if watch is None:
                return []
            return report.ordered(watch.results.values(), watch.model.manifest)

    # --- load time -----------------------------------------------------------------------

    def _tolerance(self, model: LoadedModel, changes: list[str]) -> Tolerance:
        """Exact when nothing outside the manifest changed and the numerics are deterministic;
        the manifest's tolerance otherwise."""
        exact = (
            not changes and model.manifest.numerics.deterministic and self.settings.deterministic
        )
        return Tolerance.of(model.manifest, exact)

    def _find_golden(
        self, ident: ModelIdentity, canonical: dict[str, object]
    ) -> tuple[GoldenRecord | None, str]:
        """The record to compare with, and a problem that fails the restart check by itself
        (a version redefined without a version bump, or an unreadable record)."""
        try:
            golden = self.store.find(ident)
            if golden is not None:
                return golden, ""
            others = self.store.others(ident)
            if not others:
                return None, ""
            newest = others[0]
            changed = manifest_changes(newest.get("manifest", {}), canonical)
            if newest.get("weights_sha256") != ident.weights_sha256:
                changed.append(
                    f"weights.sha256: {str(newest.get('weights_sha256'))[:16]}... -> "
                    f"{ident.weights_sha256[:16]}..."
                )
            problem = (
                f"{ident.ref} was recorded with fingerprint {str(newest['fingerprint'])[:16]} "
                f"and now has {ident.fingerprint[:16]}: the version was redefined without a "
                f"version bump (changed: {'; '.join(changed) or 'nothing in the manifest'}); "
                "give the changed manifest a new version"
            )
            return self.store.load(Path(newest["path"])), problem
        except ConsistencyFailure as exc:
            return None, str(exc)

    def _check_at_load(self, model: LoadedModel) -> _Watch:
        """Every check once, at load: the canaries against the golden record (made now on a
        first load), which are also the first co-load measurement."""
        ident, manifest = model.identity, model.manifest
        started = time.perf_counter()
        watch = self._new_watch(model)
        env = environment(model.device, manifest)
        golden, problem = self._find_golden(ident, manifest.canonical())
        run = run_canaries(model, canaries(model.manifest.modality))
        recorded_now = False
        if golden is None and not problem and self.store.read_only:
            problem = (
                f"no golden record of {ident.ref} with fingerprint {ident.fingerprint[:16]} in "
                f"the shipped --golden-dir {self.store.root} (a read-only reference is never "
                "recorded by a replica): ship the record made by a first load of this version"
            )
        elif golden is None and not problem:
            golden, run, recorded_now = self._record_golden(model, watch, env, run)
        if golden is not None and golden.fingerprint == ident.fingerprint:
            watch.golden = golden
        changes = env_changes(golden.environment, env, manifest.framework) if golden else []
        tol = self._tolerance(model, changes)
        now = time.time()

        rows = [self._weights_row(watch, golden, problem, now), self._training_row(model, now)]
        if golden is None:
            unknown = Diff(NAN, NAN, False)
            comparison = GoldenComparison(
                unknown, {s.name: unknown for s in manifest.layers}, [], []
            )
        else:
            comparison = compare_golden(run.embeddings, golden.embeddings, manifest, tol)
        rows.append(self._preprocess_row(ident, comparison, now))
        context = report.restart_context(golden, comparison, changes, run, recorded_now)
        restart = report.layer_rows(ident, "restart", comparison.layers, tol, now, bool(problem))
        rows += restart
        rows.append(report.summary(ident, "restart", restart, tol, context, now, problem))
        rows += self._coload_at_load_rows(model, restart, tol, now, problem)
        rows.append(self._flags_row(ident, now))
        seconds = time.perf_counter() - started
        self._publish(watch, rows, {"restart": seconds})
        log.info(
            "%s load-time checks took %.2fs: restart max|d| %.3g (%s)%s",
            ident.ref,
            seconds,
            max((o.max_abs_diff for o in restart), default=0.0),
            tol.describe(),
            f"; {problem}" if problem else "",
        )
        return watch

    def _new_watch(self, model: LoadedModel) -> _Watch:
        """Starts watching a model: its in-memory checksum now is the reference."""
        started = time.perf_counter()
        checksum = model.backbone.state_checksum()
        watch = _Watch(model.identity, model, checksum, time.perf_counter() - started)
        watch.last_checksum = checksum
        with self._lock:
            self._watches[watch.key] = watch
        return watch

    def _record_golden(
        self, model: LoadedModel, watch: _Watch, env: dict[str, str], run: CanaryPass
    ) -> tuple[GoldenRecord, CanaryPass, bool]:
        """Saves this run as the version's golden record. When this process's record is the
        one kept (another may have won the race), one canary is embedded again so that the
        record is compared with something: it must reproduce exactly."""
        ident = model.identity
        record = GoldenRecord(
            name=ident.name,
            version=ident.version,
            fingerprint=ident.fingerprint,
            weights_sha256=ident.weights_sha256,
            manifest=model.manifest.canonical(),
            environment=env,
            state_checksum=watch.reference_checksum,
            recorded_at=time.time(),
            canary_set=CANARY_SET_VERSION,
            embeddings=run.embeddings,
        )
        golden = self.store.save(record)
        recorded_now = golden.recorded_at == record.recorded_at
        if recorded_now:
            run = run_canaries(model, canaries(model.manifest.modality), only=[0])
        return golden, run, recorded_now

    def _coload_at_load_rows(
        self, model: LoadedModel, restart: list[Outcome], tol: Tolerance, now: float, problem: str
    ) -> list[Outcome]:
        """The restart numbers double as the first co-load measurement: this model next to
        the others loaded now."""
        others = [m.identity.ref for m in self.models.loaded() if m is not model]
        coload = [replace(o, check="coload") for o in restart]
        context = f"at load; {report.others_words(others)}"
        summary = report.summary(model.identity, "coload", coload, tol, context, now, problem)
        return [*coload, summary]

    def _weights_row(
        self, watch: _Watch, golden: GoldenRecord | None, problem: str, now: float
    ) -> Outcome:
        w = watch.model.weights
        checksum = watch.reference_checksum
        detail = (
            f"file {w.path.name} ({w.size} bytes) SHA-256 {w.sha256[:16]}... verified at load; "
            f"in-memory checksum {checksum[:16]}..."
        )
        ok = True
        if golden is not None and not problem:
            ok = golden.state_checksum == checksum
            detail += (
                " equals the golden one"
                if ok
                else f" differs from the golden {golden.state_checksum[:16]}..."
            )
        return report.row(watch.identity, "weights", "", report.flag(ok), STRICT, detail, now)

    def _training_row(self, model: LoadedModel, now: float) -> Outcome:
        training = model.backbone.training_modules()
        detail = (
            "every module in eval mode"
            if not training
            else f"{len(training)} module(s) in training mode: {training[:5]}"
        )
        return report.row(
            model.identity, "training_mode", "", report.flag(not training), STRICT, detail, now
        )

    @staticmethod
    def _preprocess_row(ident: ModelIdentity, comparison: GoldenComparison, now: float) -> Outcome:
        n = len(comparison.compared)
        detail = f"{n} canary tensors vs their golden SHA-256" if n else ""
        return report.row(ident, "preprocess", "", comparison.preprocess, STRICT, detail, now)

    # --- while serving ---------------------------------------------------------------------

    def _golden_rows(
        self, watch: _Watch, run: CanaryEmbeddings, check: str, when: str
    ) -> tuple[list[Outcome], Tolerance]:
        model, ident = watch.model, watch.identity
        assert watch.golden is not None
        env = environment(model.device, model.manifest)
        changes = env_changes(watch.golden.environment, env, model.manifest.framework)
        tol = self._tolerance(model, changes)
        comparison = compare_golden(run, watch.golden.embeddings, model.manifest, tol)
        now = time.time()
        layers = report.layer_rows(ident, check, comparison.layers, tol, now)
        others = [m.identity.ref for m in self.models.loaded() if m is not model]
        context = f"{when}; {report.others_words(others)}; {report.env_words(changes)}"
        rows = [self._preprocess_row(ident, comparison, now), *layers]
        rows.append(report.summary(ident, check, layers, tol, context, now))
        return rows, tol

    def _full_check(self, watch: _Watch) -> None:
        """weights, training_mode, preprocess, coload, batch and flags, now."""
        model, ident = watch.model, watch.identity
        with ExitStack() as stack:
            if not _hold(stack, model):
                return
            with self._run_lock:
                self._sample_weights(watch, follow_up=False)
                if watch.golden is not None:
                    started = time.perf_counter()
                    batch_size = max(1, self.settings.max_batch_size)
                    keep = batch_layers(model.manifest, batch_size)
                    run = run_canaries(model, canaries(model.manifest.modality), keep=keep)
                    rows, _ = self._golden_rows(
                        watch, run.embeddings, "coload", "periodic/on demand"
                    )
                    self._publish(watch, rows, {"coload": time.perf_counter() - started})
                    started = time.perf_counter()
                    tol = Tolerance.of(model.manifest, exact=False)
                    diffs, count = batch_check(
                        model, canaries(model.manifest.modality), run.kept, batch_size, tol
                    )
                    now = time.time()
                    rows = report.layer_rows(ident, "batch", diffs, tol, now)
                    context = (
                        f"{count} canaries alone vs inside one batch of {batch_size} "
                        f"({batch_size - count} other images); {len(diffs)} of "
                        f"{len(model.manifest.layers)} layers compared in full"
                    )
                    rows.append(report.summary(ident, "batch", rows, tol, context, now))
                    self._publish(watch, rows, {"batch": time.perf_counter() - started})
                self._publish(watch, [self._flags_row(ident, time.time())])

    def _coload(self, key: tuple[str, str]) -> None:
        with self._lock:
            watch = self._watches.get(key)
        if watch is None or watch.state != "serving" or watch.golden is None:
            return
        with ExitStack() as stack:
            if not _hold(stack, watch.model):
                return
            with self._run_lock:
                started = time.perf_counter()
                run = run_canaries(watch.model, canaries(watch.model.manifest.modality))
                rows, _ = self._golden_rows(watch, run.embeddings, "coload", "after a load/unload")
                rows.append(self._flags_row(watch.identity, time.time()))
                self._publish(watch, rows, {"coload": time.perf_counter() - started})

    def _schedule_coload(self, exclude: LoadedModel | None = None) -> None:
        with self._lock:
            keys = [
                w.key
                for w in self._watches.values()
                if w.state == "serving" and w.model is not exclude
            ]
        for key in keys:
            self._worker.submit(("coload", key), functools.partial(self._coload, key))

    def _periodic(self) -> None:
        with self._lock:
            watches = [w for w in self._watches.values() if w.state == "serving"]
        for watch in watches:
            self._full_check(watch)

    def _sample_weights(self, watch: _Watch, follow_up: bool = True) -> None:
        """Re-takes the in-memory checksum; a change since the last one is a mutation."""
        ident = watch.identity
        try:
            with watch.model.use():  # an unload waits for the sample to finish
                t0 = time.perf_counter()
                checksum = watch.model.backbone.state_checksum()
                seconds = time.perf_counter() - t0
                training = self._training_row(watch.model, time.time())
        except Unavailable:  # being unloaded: nothing left to sample
            watch.weights_pending = False
            return
        except Exception:  # a backbone bug: surfaced, and sampling goes on
            watch.weights_pending = False
            log.exception("%s: sampling the in-memory weights failed", ident.ref)
            METRICS.check_failures.labels(ident.name, ident.version, "weights").inc()
            return
        with self._lock:
            watch.checksum_seconds = seconds
            watch.last_weights_at = time.monotonic()
            watch.weights_pending = False
            changed = checksum != watch.last_checksum
            if changed:
                watch.mutations += 1
                watch.last_checksum = checksum
        if changed:
            METRICS.weight_mutations.labels(ident.name, ident.version).inc()
            log.error(
                "%s: in-memory parameters/buffers changed during inference (%s... -> %s...)",
                ident.ref,
                watch.reference_checksum[:16],
                checksum[:16],
            )
        same = checksum == watch.reference_checksum
        detail = (
            f"in-memory checksum {checksum[:16]}... equals the one taken at load"
            if same
            else (
                f"in-memory parameters/buffers changed since load ({watch.reference_checksum[:16]}"
                f"... -> {checksum[:16]}...); {watch.mutations} mutation(s) seen"
            )
        )
        now = time.time()
        rows = [report.row(ident, "weights", "", report.flag(same), STRICT, detail, now), training]
        self._publish(watch, rows)
        if changed and follow_up and watch.mutations == 1:  # measure what it did, once
            self._worker.submit(("full", watch.key), lambda: self._full_check(watch))

    # --- cache audit -----------------------------------------------------------------------

    def _run_audits(self) -> None:
        while (queued := self.audits.take()) is not None:
            model, hits = queued
            with self._lock:
                watch = self._watches.get((model.identity.name, model.identity.version))
            if watch is None or watch.model is not model:
                continue
            with ExitStack() as stack:
                if _hold(stack, model):
                    self._audit_hits(watch, hits)

    def _audit_hits(self, watch: _Watch, hits: list[CacheHit]) -> None:
        started = time.perf_counter()
        rows = audit_hits(watch.model, hits, self.settings.max_image_pixels, self.cache)
        self._publish(watch, rows, {"cache_audit": time.perf_counter() - started})

    # --- process flags -----------------------------------------------------------------------

    def _flags_row(self, ident: ModelIdentity, now: float) -> Outcome:
        differs = self._flags.observe()
        detail = "as at start" if not differs else "changed since start: " + ", ".join(differs)
        return report.row(ident, "flags", "", report.flag(not differs), STRICT, detail, now)

    # --- bookkeeping --------------------------------------------------------------------------

    def _publish(
        self, watch: _Watch, rows: list[Outcome], durations: dict[str, float] | None = None
    ) -> None:
        with self._lock:
            if self._watches.get(watch.key) is not watch:
                return  # unloaded or reloaded meanwhile
            for o in rows:
                watch.results[(o.check, o.layer)] = o
            report.publish(rows)
            for check, seconds in (durations or {}).items():
                report.publish_duration(watch.identity, check, seconds)

    def _prune_failed(self) -> None:
        """Forgets models whose failed load was cleared (unloaded) since."""
        with self._lock:
            for watch in list(self._watches.values()):
                if watch.state != "failed":
                    continue
                state, _ = self.models.state(watch.model.manifest)
                if state is not ModelState.FAILED:
                    del self._watches[watch.key]
                    report.forget(watch.identity, list(watch.results))

    def _forget(self, model: LoadedModel) -> None:
        with self._lock:
            watch = self._watches.get((model.identity.name, model.identity.version))
            if watch is None or watch.model is not model:
                return
            del self._watches[watch.key]
            report.forget(watch.identity, list(watch.results))
