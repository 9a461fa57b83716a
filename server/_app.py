"""Wiring: builds every component from Settings, runs the gRPC server, and shuts down cleanly.

`Application` owns the components; `create_server` returns a started server and its port (tests
bind port 0); `ServerThread` runs one in a background thread for in-process use; `serve` is the
entry point of `embedwarden serve`, with graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections import Counter as Tally
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedwarden.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    index_pb2,
    index_pb2_grpc,
)

from . import _convert as convert
from . import _security as security
from ._cache import LmdbCache, open_cache
from ._consistency import ConsistencyMonitor
from ._errors import Overloaded
from ._extraction import ExtractionService
from ._frameworks import available_cores, configure_process, plan_threads, resolve_device
from ._index import IndexManager
from ._index_servicer import IndexServicer
from ._manifest import Manifest
from ._metrics import METRICS
from ._models import LoadedModel, ModelManager, ModelState
from ._parity import ParityMonitor, parse_pairs
from ._registry import Registry, build_registry, parse_model_ref
from ._servicer import AdminServicer, EmbeddingServicer
from ._settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name,
)


def model_health_name(manifest: Manifest) -> str:
    """Per-model health service name, e.g. `model:efficientnet_lite0@1`."""
    return f"model:{manifest.ref}"


class Application:
    """All components of one server, built from Settings."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.registry = registry or build_registry(settings.models_dirs)
        self.device = resolve_device(settings.device)
        settings = plan_threads(settings, self.device)
        self.settings = settings
        configure_process(
            deterministic=settings.deterministic, torch_threads=settings.torch_threads
        )
        self.models = ModelManager(self.registry, settings, self.device)
        workers = settings.decode_workers or available_cores()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self.extraction = ExtractionService(self.models, settings, self.executor)
        # Feature components; each _build_* wires one and registers what it needs.
        self._build_cache()
        self._build_index()
        self._build_monitor()
        self._build_parity()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.health = health.aio.HealthServicer()
        self.startup_done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: Tally[str] = Tally()
        self.models.on_change.append(self._on_model_change)

    # --- feature components -----------------------------------------------------------------

    def _build_cache(self) -> None:
        """The LMDB embedding cache (issue 3)."""
        self.cache: LmdbCache | None = open_cache(self.settings)
        self.extraction.cache = self.cache

    def _build_index(self) -> None:
        """FAISS collections (issue 4): recovered from snapshots and the log here."""
        self.index: IndexManager | None = IndexManager(
            self.settings, self.registry, self.models, self.extraction
        )

    def _build_monitor(self) -> None:
        """The consistency monitor (issue 5): load-time checks gate SERVING, the rest run on
        its own thread; cache hits are sampled for recomputation."""
        self.monitor: ConsistencyMonitor | None = ConsistencyMonitor(
            self.settings, self.models, self.registry, self.extraction.cache
        )
        self.monitor.attach()
        self.extraction.auditor = self.monitor

    def _build_parity(self) -> None:
        """Parity metrics for the configured model pairs (issue 6)."""
        pairs = parse_pairs(self.settings.parity_pairs, self.registry)
        self.parity = (
            ParityMonitor(self.models, pairs, self.settings.check_interval_s) if pairs else None
        )

    def _add_servicers(self, server: grpc.aio.Server) -> None:
        """gRPC services beyond the core two."""
        index_pb2_grpc.add_IndexServiceServicer_to_server(IndexServicer(self), server)

    def _close_components(self) -> None:
        """Flushes and closes feature components, after the last RPC finished."""
        if self.index is not None:
            self.index.close()  # snapshots every changed collection
        if self.parity is not None:
            self.parity.close()
        if self.cache is not None:
            self.cache.close()  # commits every queued write first

    # --- state shown to clients ----------------------------------------------------------

    def model_summary(self, manifest: Manifest) -> embedding_pb2.ModelSummary:
        state, detail = self.models.state(manifest)
        return convert.model_summary(manifest, state, detail, self.registry.is_default(manifest))

    def _startup_refs(self) -> list[Manifest]:
        return [self.registry.resolve_ref(ref) for ref in self.settings.models]

    def overall_serving(self) -> bool:
        if not self.startup_done.is_set():
            return False
        return all(self.models.state(m)[0] is ModelState.SERVING for m in self._startup_refs())

    def _on_model_change(self, event: str, model: LoadedModel | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._publish_health(), loop)

    async def _publish_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for manifest in self.registry.all():
            state, _ = self.models.state(manifest)
            await self.health.set(
                model_health_name(manifest),
                serving if state is ModelState.SERVING else not_serving,
            )
        overall = serving if self.overall_serving() else not_serving
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, overall)

    # --- limits ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def stream_slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Bounds concurrent ExtractStream calls per client host."""
        peer = context.peer() or "unknown"
        host = peer.rsplit(":", 1)[0]
        if self._streams[host] >= self.settings.max_streams_per_client:
            METRICS.rejected.labels("streams_per_client").inc()
            raise Overloaded(
                f"{self._streams[host]} streams already open from this client (limit "
                f"{self.settings.max_streams_per_client}); reuse a stream"
            )
        self._streams[host] += 1
        try:
            yield
        finally:
            self._streams[host] -= 1
            if self._streams[host] <= 0:
                del self._streams[host]

    # --- lifecycle ------------------------------------------------------------------------

    def _grpc_options(self) -> list[tuple[str, int]]:
        size = self.settings.max_message_bytes
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ]

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        security.check_policy(self.settings)
        server = grpc.aio.server(
            interceptors=security.interceptors(self.settings),
            options=self._grpc_options(),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(EmbeddingServicer(self), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self), server)
        self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._publish_health()
        credentials = security.server_credentials(self.settings)
        if credentials is None:
            self.port = server.add_insecure_port(self.settings.address)
        else:
            self.port = server.add_secure_port(self.settings.address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.address}")
        await server.start()
        if self.settings.port_file is not None:
            _write_port_file(self.settings.port_file, self.port)
        self.server = server
        if self.settings.metrics_port >= 0:
            self.metrics_port = METRICS.serve(
                self.settings.metrics_host, self.settings.metrics_port
            )
        log.info(
            "listening on %s:%d (metrics on %s:%d), device %s, %d inference lanes x %d "
            "threads, batches up to %d",
            self.settings.host,
            self.port,
            self.settings.metrics_host,
            self.metrics_port,
            self.device,
            self.settings.inference_lanes,
            self.settings.torch_threads,
            self.settings.max_batch_size,
        )
        threading.Thread(target=self._load_startup_models, name="startup-load", daemon=True).start()
        return self.port

    def _load_startup_models(self) -> None:
        try:
            for ref in self.settings.models:
                try:
                    self.models.load(*parse_model_ref(ref))
                except Exception as exc:
                    log.error("startup load of %s failed: %s", ref, exc)
        finally:
            self.startup_done.set()
            self._on_model_change("startup", None)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting, lets in-flight RPCs finish within `grace`, then releases models."""
        grace = self.settings.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self.monitor is not None:  # before models go: a running check would delay unload
            await asyncio.to_thread(self.monitor.close)
        await asyncio.to_thread(self.models.close)
        self.executor.shutdown(wait=True, cancel_futures=True)
        await asyncio.to_thread(self._close_components)
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


def _write_port_file(path: Path, port: int) -> None:
    """Writes the bound port atomically, so a reader never sees a partial number."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


async def create_server(
    settings: Settings, registry: Registry | None = None
) -> tuple[Application, int]:
    """Builds and starts the application on the running loop; returns it and its bound port."""
    app = Application(settings, registry)
    port = await app.start()
    return app, port


class ServerThread:
    """Runs an Application on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.app = Application(settings, registry)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )

    def start(self, wait_loaded: float | None = 300.0) -> int:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.app.start(), self._loop).result()
        if wait_loaded is not None and not self.app.startup_done.wait(wait_loaded):
            raise TimeoutError("startup models did not load in time")
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stop(self, grace: float = 5.0) -> None:
        asyncio.run_coroutine_threadsafe(self.app.stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _serve(settings: Settings) -> int:
    app = Application(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (grace %.0fs)", settings.grace_s)
    await app.stop()
    return 0


def serve(settings: Settings) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the process exit code."""
    return asyncio.run(_serve(settings))
