"""Every Prometheus metric of the service, defined in this one module.

Conventions: one `embedwarden_` prefix, units in names, explicit buckets (geometric for latency,
powers of two for batch sizes), label values from bounded sets (model, version, layer, check,
method, code, stage). Metrics live in a private registry so that tests can read them directly;
the process collector is registered on it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

PREFIX = "embedwarden"

# 100 us .. ~105 s, factor 2.
LATENCY_BUCKETS = tuple(0.0001 * 2**i for i in range(21))
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 .. 1024


FINGERPRINT_LABEL_DIGITS = 16


def fingerprint_label(fingerprint: str) -> str:
    """The short form of a fingerprint used as a label value (Kubernetes allows 63 chars)."""
    return fingerprint[:FINGERPRINT_LABEL_DIGITS]


class Metrics:
    """Holds the metric objects; `METRICS` is the process-wide instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "RPCs handled, by method and final status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "RPC handling time, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            f"{PREFIX}_extract_stage_seconds",
            "Time per Extract request spent in each stage (cache, queue, preprocess, "
            "inference, total).",
            ["model", "version", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            f"{PREFIX}_extracted_items_total",
            "Inputs embedded, by model and whether the cache served them.",
            ["model", "version", "source"],
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Inputs per inference batch formed by the dynamic batcher.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.wide_batches = Counter(
            f"{PREFIX}_wide_batches_total",
            "Batches run on every lane's cores because the server was otherwise idle.",
            ["model", "version"],
            registry=r,
        )
        self.wide_shape_checks = Counter(
            f"{PREFIX}_wide_shape_checks_total",
            "First wide batches of a shape, run narrow and wide and compared: identical (the "
            "shape runs wide from then on) or different (it stays narrow).",
            ["model", "version", "result"],
            registry=r,
        )
        # `fingerprint` (its first 16 hex digits, a valid Kubernetes label value): an HPA of
        # one fingerprint's replicas selects its own queue through prometheus-adapter.
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Inputs of requests waiting for inference, per model (background work excluded).",
            ["model", "version", "fingerprint"],
            registry=r,
        )
        # Apart from queue_depth, which the HPA scales on: background work (Verify's diagnosis)
        # only ever runs on idle lanes, and more replicas would not make it any sooner.
        self.background_queue_depth = Gauge(
            f"{PREFIX}_background_queue_depth",
            "Background inputs (Verify's diagnosis) waiting for an idle inference lane.",
            ["model", "version"],
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_total",
            "Requests refused before any work because a limit or queue was full.",
            ["reason"],
            registry=r,
        )
        self.model_load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds",
            "Wall time of the last load of a model version, warm-up and checks included.",
            ["model", "version"],
            registry=r,
        )
        self.model_serving = Gauge(
            f"{PREFIX}_model_serving",
            "1 while a model version is loaded and serving, else 0.",
            ["model", "version"],
            registry=r,
        )
        # Cache.
        self.cache_lookups = Counter(
            f"{PREFIX}_cache_lookups_total",
            "Cache lookups by result (hit, miss, corrupt).",
            ["result"],
            registry=r,
        )
        self.cache_evictions = Counter(
            f"{PREFIX}_cache_evictions_total", "Cache entries evicted for space.", registry=r
        )
        self.cache_writes = Counter(
            f"{PREFIX}_cache_writes_total", "Cache entries written.", registry=r
        )
        self.cache_dropped_writes = Counter(
            f"{PREFIX}_cache_dropped_writes_total",
            "Cache writes dropped because the write queue was full.",
            registry=r,
        )
        self.cache_bytes = Gauge(
            f"{PREFIX}_cache_used_bytes", "Bytes used by the cache database.", registry=r
        )
        self.cache_entries = Gauge(f"{PREFIX}_cache_entries", "Entries in the cache.", registry=r)
        self.cache_bound_bytes = Gauge(
            f"{PREFIX}_cache_bound_bytes",
            "The cache's effective size bound: --cache-max-bytes, or less to keep "
            "--min-free-disk-bytes free on the data dir's filesystem.",
            registry=r,
        )
        # Storage.
        self.data_dir_free_bytes = Gauge(
            f"{PREFIX}_data_dir_free_bytes",
            "Free bytes on the data directory's filesystem.",
            registry=r,
        )
        self.storage_write_failures = Counter(
            f"{PREFIX}_storage_write_failures_total",
            "Writes to the data directory that failed, by store (cache, index, snapshot, "
            "golden) and reason (disk_full, no_room, error).",
            ["store", "reason"],
            registry=r,
        )
        # Index.
        self.index_vectors = Gauge(
            f"{PREFIX}_index_vectors", "Vectors per collection.", ["collection"], registry=r
        )
        self.index_bytes = Gauge(
            f"{PREFIX}_index_bytes",
            "Serialized index size per collection.",
            ["collection"],
            registry=r,
        )
        self.index_recovering = Gauge(
            f"{PREFIX}_index_recovering",
            "1 while a collection is being recovered (snapshot and log replay) after a start.",
            ["collection"],
            registry=r,
        )
        # Consistency.
        self.check_passed = Gauge(
            f"{PREFIX}_consistency_check_passed",
            "1 if the last run of a consistency check passed, 0 if it failed.",
            ["model", "version", "layer", "check"],
            registry=r,
        )
        self.check_max_abs_diff = Gauge(
            f"{PREFIX}_consistency_max_abs_diff",
            "Max absolute difference measured by the last run of a consistency check.",
            ["model", "version", "layer", "check"],
            registry=r,
        )
        self.check_min_cosine = Gauge(
            f"{PREFIX}_consistency_min_cosine",
            "Minimum cosine similarity measured by the last run of a consistency check.",
            ["model", "version", "layer", "check"],
            registry=r,
        )
        self.check_timestamp = Gauge(
            f"{PREFIX}_consistency_last_run_timestamp_seconds",
            "Unix time of the last run of a consistency check.",
            ["model", "version", "layer", "check"],
            registry=r,
        )
        self.check_failures = Counter(
            f"{PREFIX}_consistency_failures_total",
            "Failed runs of a consistency check.",
            ["model", "version", "check"],
            registry=r,
        )
        self.check_duration = Gauge(
            f"{PREFIX}_consistency_check_duration_seconds",
            "Wall time of the last run of a consistency check (all its layers and canaries).",
            ["model", "version", "check"],
            registry=r,
        )
        self.weight_mutations = Counter(
            f"{PREFIX}_weight_mutations_total",
            "In-memory parameter or buffer changes detected after inference.",
            ["model", "version"],
            registry=r,
        )
        self.cache_audit = Counter(
            f"{PREFIX}_cache_audit_total",
            "Cache hits recomputed and compared, by result: match (bit-identical), "
            "within_tolerance (differs by batch rounding only), mismatch.",
            ["model", "version", "result"],
            registry=r,
        )
        self.cache_audit_skipped = Counter(
            f"{PREFIX}_cache_audit_skipped_total",
            "Sampled cache hits not audited because the audit's CPU budget "
            "(--cache-audit-max-per-s) was spent.",
            ["model", "version"],
            registry=r,
        )
        self.process_flags = Info(
            f"{PREFIX}_process_flags",
            "Process-wide numeric flags and library versions that can change model outputs.",
            registry=r,
        )
        self.process_flag_changes = Counter(
            f"{PREFIX}_process_flag_changes_total",
            "Changes of process-wide numeric flags seen while running.",
            ["flag"],
            registry=r,
        )
        self.parity_max_abs_diff = Gauge(
            f"{PREFIX}_parity_max_abs_diff",
            "Max absolute difference between two configured models on the canary photos.",
            ["model_a", "model_b", "layer"],
            registry=r,
        )
        self.parity_min_cosine = Gauge(
            f"{PREFIX}_parity_min_cosine",
            "Minimum cosine similarity between two configured models on the canary photos.",
            ["model_a", "model_b", "layer"],
            registry=r,
        )
        self.parity_top1_agreement = Gauge(
            f"{PREFIX}_parity_top1_agreement",
            "Fraction of canary photos on which two configured models agree on the top class.",
            ["model_a", "model_b", "layer"],
            registry=r,
        )
        # Verification of users' own vectors: `pipeline` is a bounded label (see verify).
        self.verify_items = Counter(
            f"{PREFIX}_verify_items_total",
            "Submitted vectors verified, by the pipeline that made them and the verdict "
            "(pass, within_tolerance, fail).",
            ["model", "version", "layer", "pipeline", "verdict"],
            registry=r,
        )
        self.verify_min_cosine = Gauge(
            f"{PREFIX}_verify_min_cosine",
            "Lowest cosine to the reference in the pipeline's latest Verify request.",
            ["model", "version", "layer", "pipeline"],
            registry=r,
        )
        self.verify_diagnosis = Counter(
            f"{PREFIX}_verify_diagnosis_total",
            "Failing vectors diagnosed, by the catalogued mistake that reproduces them best "
            "('unknown' when none does).",
            ["pipeline", "mistake"],
            registry=r,
        )
        self.verify_diagnosis_skipped = Counter(
            f"{PREFIX}_verify_diagnosis_skipped_total",
            "Failing vectors not diagnosed because the request's diagnosis budget was spent.",
            ["pipeline"],
            registry=r,
        )
        self._server_lock = threading.Lock()

    # Small helpers keep call sites short and label orders in one place.

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_latency.labels(method).observe(seconds)

    def observe_stages(self, model: str, version: str, stages: Mapping[str, float]) -> None:
        for stage, seconds in stages.items():
            self.stage_latency.labels(model, version, stage).observe(seconds)

    def depth_setter(
        self, model: str, version: str, fingerprint: str
    ) -> Callable[[int, int], None]:
        """Sets the foreground and background queue depths of one model version."""
        foreground = self.queue_depth.labels(model, version, fingerprint_label(fingerprint))
        background = self.background_queue_depth.labels(model, version)

        def set_depths(waiting: int, waiting_background: int) -> None:
            foreground.set(waiting)
            background.set(waiting_background)

        return set_depths

    def set_flags(self, flags: Mapping[str, str]) -> None:
        self.process_flags.info(dict(flags))

    def forget_model(self, model: str, version: str, fingerprint: str) -> None:
        """Drops per-model gauges of an unloaded model so dashboards don't show stale values."""
        self.model_serving.labels(model, version).set(0)
        self.queue_depth.labels(model, version, fingerprint_label(fingerprint)).set(0)
        self.background_queue_depth.labels(model, version).set(0)

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP exporter; returns the bound port (port 0 picks a free one)."""
        with self._server_lock:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
            return int(server.server_port)

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Current value of one sample, for tests and the CLI; None if absent."""
        value = self.registry.get_sample_value(name, dict(labels or {}))
        return None if value is None else float(value)


METRICS = Metrics()
