"""Wiring: builds every component from Settings, runs the gRPC server, and shuts down cleanly.

`Application` owns the components and hands each servicer the ones it calls; `create_server`
returns a started server and its port (tests bind port 0); `serve` is the entry point of
`embedwarden serve`, with graceful shutdown on SIGTERM/SIGINT. (`testing.ServerThread` runs an
Application in a background thread for in-process use.)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedwarden.v1 import admin_pb2, embedding_pb2, index_pb2

from ._frameworks import available_cores, configure_process, plan_threads, resolve_device
from ._metrics import METRICS
from ._settings import Settings
from ._storage import check_writable
from .cache import LmdbCache, open_cache
from .consistency import ConsistencyMonitor, ParityMonitor, parse_pairs
from .index import IndexManager
from .models import Manifest, Registry, build_registry, parse_model_ref
from .rpc import (
    AdminServicer,
    EmbeddingServicer,
    IndexServicer,
    StreamSlots,
    add_servicer,
    check_policy,
    interceptors,
    server_credentials,
)
from .serving import ExtractionService, LoadedModel, ModelManager, ModelState
from .verify import VerificationService

log = logging.getLogger(__name__)

EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
INDEX_SERVICE = index_pb2.DESCRIPTOR.services_by_name["IndexService"]
SERVICE_NAMES = tuple(s.full_name for s in (EMBEDDING_SERVICE, ADMIN_SERVICE, INDEX_SERVICE))


# SERVING once the startup loads were attempted, whatever their outcome, until shutdown: a
# process that answers it is alive (startup and liveness probes). Whether it may take traffic
# is what the model names and "" say (readiness): a model that failed its checks is drained,
# not restarted.
LIVE_NAME = "live"


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
            deterministic=settings.deterministic,
            torch_threads=settings.torch_threads,
            lanes=settings.inference_lanes,
        )
        self.models = ModelManager(self.registry, settings, self.device)
        workers = settings.decode_workers or available_cores()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        check_writable(settings.data_dir)  # a read-only data dir: one clear line, exit code 2
        self.cache: LmdbCache | None = open_cache(self.settings)  # None with --cache false
        # Load-time checks gate SERVING; the rest run on the monitor's thread, which also
        # recomputes a sample of the cache hits that extraction serves.
        self.monitor = ConsistencyMonitor(self.settings, self.models, self.registry, self.cache)
        self.monitor.attach()
        self.extraction = ExtractionService(
            self.models, settings, self.executor, self.cache, auditor=self.monitor.audits
        )
        self.verification = VerificationService(self.extraction, settings, self.executor)
        # Collections are recovered from their snapshots and logs once the startup models are
        # loaded, in the background: a long log replay never holds the models' readiness.
        self.startup_done = threading.Event()
        self.index = IndexManager(
            self.settings, self.registry, self.models, self.extraction, self.startup_done
        )
        pairs = parse_pairs(self.settings.parity_pairs, self.registry)
        self.parity = (
            ParityMonitor(self.models, pairs, self.settings.check_interval_s) if pairs else None
        )
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None  # --health-port
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.health = health.aio.HealthServicer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.models.on_change.append(self._on_model_change)

    def _add_servicers(self, server: grpc.aio.Server) -> None:
        streams = StreamSlots(self.settings.max_streams_per_client)
        embedding = EmbeddingServicer(
            self.extraction, self.verification, self.models, self.registry, self.device, streams
        )
        admin = AdminServicer(self.models, self.registry, self.settings, self.cache, self.monitor)
        add_servicer(server, EMBEDDING_SERVICE, embedding)
        add_servicer(server, ADMIN_SERVICE, admin)
        add_servicer(server, INDEX_SERVICE, IndexServicer(self.index))

    def _close_components(self) -> None:
        """Flushes and closes the stores, after the last RPC finished."""
        self.index.close()  # snapshots every changed collection
        if self.parity is not None:
            self.parity.close()
        if self.cache is not None:
            self.cache.close()  # commits every queued write first

    # --- health ---------------------------------------------------------------------------

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
        await self.health.set(LIVE_NAME, serving if self.startup_done.is_set() else not_serving)

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
        check_policy(self.settings)
        server = grpc.aio.server(
            interceptors=interceptors(self.settings),
            options=self._grpc_options(),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._publish_health()
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = server.add_insecure_port(self.settings.address)
        else:
            self.port = server.add_secure_port(self.settings.address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.address}")
        await server.start()
        if self.settings.health_port >= 0:
            await self._start_health_server()
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

    async def _start_health_server(self) -> None:
        """Health only, in plaintext on any address: kubelet gRPC probes cannot use TLS, and
        health carries no data (it is open without a token on the main port too)."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = self.settings.address.rsplit(":", 1)[0]
        self.health_port = server.add_insecure_port(f"{host}:{self.settings.health_port}")
        if self.health_port == 0:
            raise OSError(f"could not bind the health port {host}:{self.settings.health_port}")
        await server.start()
        self.health_server = server

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
        if self.health_server is not None:
            await self.health_server.stop(0)
        # The monitor before the models: a running check would delay their unload.
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
