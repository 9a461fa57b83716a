"""Thin gRPC servicers: request message -> domain call -> response message.

Each servicer receives the components it calls (built and owned by `_app.Application`), never
the application itself. Error mapping and request metrics come from the `rpc_method`
decorators; validation and all real work live in the domain packages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from embedwarden.client.tensor import encode, field_number, message_field
from embedwarden.v1 import admin_pb2, admin_pb2_grpc, embedding_pb2, embedding_pb2_grpc

from .._errors import FailedPrecondition, InvalidInput, Overloaded
from .._metrics import METRICS
from .._settings import Settings
from ..cache import LmdbCache
from ..consistency import ConsistencyMonitor, ParityReport, compare_models
from ..models import Manifest, Registry
from ..serving import ExtractionService, ModelManager
from ..verify import VerificationService
from . import _convert as convert
from . import _verify_convert as verify_convert
from ._register import Encoded
from ._status import describe, rpc_method, rpc_stream_method

STREAM_WINDOW = 4  # stream messages processed concurrently; responses stay in order
MAX_PING_RESPONSE_BYTES = 16 * 1024 * 1024
_STREAM_RESPONSE = field_number(embedding_pb2.ExtractStreamResponse, "response")
StreamReply = embedding_pb2.ExtractStreamResponse | Encoded


def summarize(
    manifest: Manifest, models: ModelManager, registry: Registry
) -> embedding_pb2.ModelSummary:
    """A model version's summary as clients see it: its state now and whether it is the default."""
    state, detail = models.state(manifest)
    return convert.model_summary(manifest, state, detail, registry.is_default(manifest))


class StreamSlots:
    """Bounds concurrent ExtractStream calls per client host."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        peer = context.peer() or "unknown"
        host = peer.rsplit(":", 1)[0]
        if self._open[host] >= self.per_client:
            METRICS.rejected.labels("streams_per_client").inc()
            raise Overloaded(
                f"{self._open[host]} streams already open from this client (limit "
                f"{self.per_client}); reuse a stream"
            )
        self._open[host] += 1
        try:
            yield
        finally:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(
        self,
        extraction: ExtractionService,
        verification: VerificationService,
        models: ModelManager,
        registry: Registry,
        device: str,
        streams: StreamSlots,
    ) -> None:
        self.extraction = extraction
        self.verification = verification
        self.models = models
        self.registry = registry
        self.device = device
        self.streams = streams

    async def _extract(self, request: embedding_pb2.ExtractRequest) -> bytes:
        """The ExtractResponse, in wire form."""
        name, version = convert.model_ref(request.model, self.registry)
        options = convert.extract_options(request)
        sources = convert.image_sources(request.inputs)
        result = await self.extraction.extract(name, version, sources, options)
        return convert.extract_response(result)

    @rpc_method("Extract")
    async def Extract(  # type: ignore[override]  # answers in wire form, see `_register`
        self, request: embedding_pb2.ExtractRequest, context: grpc.aio.ServicerContext
    ) -> Encoded:
        return Encoded(await self._extract(request))

    async def _stream_one(self, message: embedding_pb2.ExtractStreamRequest) -> StreamReply:
        try:
            response = await self._extract(message.request)
            head = embedding_pb2.ExtractStreamResponse(request_id=message.request_id)
            return Encoded(encode(head, message_field(_STREAM_RESPONSE, [response])))
        except Exception as exc:  # domain errors and bugs alike: one message's error
            code, text = describe(exc)
            return embedding_pb2.ExtractStreamResponse(
                request_id=message.request_id,
                error=embedding_pb2.StreamError(code=code.value[0], message=text),
            )

    @rpc_stream_method("ExtractStream")
    async def ExtractStream(  # type: ignore[override]  # wire-form replies, see `_register`
        self,
        request_iterator: AsyncIterator[embedding_pb2.ExtractStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[StreamReply]:
        async with self.streams.slot(context):
            queue: asyncio.Queue[asyncio.Task[StreamReply] | None]
            queue = asyncio.Queue(maxsize=STREAM_WINDOW)

            async def read() -> None:
                try:
                    async for message in request_iterator:
                        await queue.put(asyncio.ensure_future(self._stream_one(message)))
                finally:
                    await queue.put(None)

            reader = asyncio.ensure_future(read())
            try:
                while (task := await queue.get()) is not None:
                    yield await task
                await reader  # re-raises a failure of the request stream itself
            finally:
                reader.cancel()
                while not queue.empty():
                    pending = queue.get_nowait()
                    if pending is not None:
                        pending.cancel()

    @rpc_method("ListModels")
    async def ListModels(
        self, request: embedding_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.ListModelsResponse:
        return embedding_pb2.ListModelsResponse(
            models=[summarize(m, self.models, self.registry) for m in self.registry.all()]
        )

    @rpc_method("DescribeModel")
    async def DescribeModel(
        self, request: embedding_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.DescribeModelResponse:
        name, version = convert.model_ref(request.model, self.registry)
        manifest = self.registry.resolve(name, version)
        summary = summarize(manifest, self.models, self.registry)
        return convert.describe_model(manifest, summary, self.device)

    @rpc_method("Verify")
    async def Verify(
        self, request: embedding_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.VerifyResponse:
        name, version = convert.model_ref(request.model, self.registry)
        sources = convert.image_sources(request.inputs)
        vectors = [convert.vector(v, f"vectors[{i}]") for i, v in enumerate(request.vectors)]
        options = verify_convert.verify_options(request)
        result = await self.verification.verify(name, version, sources, vectors, options)
        return verify_convert.verify_response(result)

    @rpc_method("Ping")
    async def Ping(
        self, request: embedding_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.PingResponse:
        if request.response_bytes > MAX_PING_RESPONSE_BYTES:
            raise InvalidInput(f"response_bytes is limited to {MAX_PING_RESPONSE_BYTES}")
        return embedding_pb2.PingResponse(payload=bytes(request.response_bytes))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        models: ModelManager,
        registry: Registry,
        settings: Settings,
        cache: LmdbCache | None,
        monitor: ConsistencyMonitor,
    ) -> None:
        self.models = models
        self.registry = registry
        self.settings = settings
        self.cache = cache  # None with --cache false
        self.monitor = monitor

    @rpc_method("LoadModel")
    async def LoadModel(
        self, request: admin_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.LoadModelResponse:
        name, version = convert.model_ref(request.model, self.registry)
        model = await asyncio.to_thread(self.models.load, name, version)
        return admin_pb2.LoadModelResponse(
            model=summarize(model.manifest, self.models, self.registry),
            load_seconds=model.load_seconds,
        )

    @rpc_method("UnloadModel")
    async def UnloadModel(
        self, request: admin_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UnloadModelResponse:
        name, version = convert.model_ref(request.model, self.registry)
        identity = await asyncio.to_thread(self.models.unload, name, version, self.settings.grace_s)
        return admin_pb2.UnloadModelResponse(model=convert.identity(identity))

    @rpc_method("GetCacheStats")
    async def GetCacheStats(
        self, request: admin_pb2.GetCacheStatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetCacheStatsResponse:
        cache = self.cache
        if cache is None:
            return admin_pb2.GetCacheStatsResponse(enabled=False)
        stats = await asyncio.to_thread(cache.stats)
        return convert.cache_stats(stats, self.registry)

    @rpc_method("PurgeCache")
    async def PurgeCache(
        self, request: admin_pb2.PurgeCacheRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PurgeCacheResponse:
        cache = self.cache
        if cache is None:
            raise FailedPrecondition("this server runs without a cache (--cache false)")
        fingerprint = None
        if request.HasField("model"):
            name, version = convert.model_ref(request.model, self.registry)
            if not version:
                raise InvalidInput(
                    f"purge one version at a time: give NAME@VERSION, not {name!r} alone"
                )
            fingerprint = self.registry.resolve(name, version).fingerprint()
        removed = await asyncio.to_thread(cache.purge, fingerprint)
        return admin_pb2.PurgeCacheResponse(removed=removed)

    @rpc_method("CheckConsistency")
    async def CheckConsistency(
        self, request: admin_pb2.CheckConsistencyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CheckConsistencyResponse:
        name, version = convert.model_ref(request.model, self.registry, required=False)
        result = await asyncio.to_thread(self.monitor.check, name, version)
        return convert.consistency_report(result)

    @rpc_method("CompareModels")
    async def CompareModels(
        self, request: admin_pb2.CompareModelsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CompareModelsResponse:
        a = self.models.get(*convert.model_ref(request.model_a, self.registry, what="model_a"))
        b = self.models.get(*convert.model_ref(request.model_b, self.registry, what="model_b"))
        settings = self.settings
        sources = convert.image_sources(request.inputs)

        def compare() -> ParityReport:
            with a.use(), b.use():  # an unload waits for the comparison to finish
                return compare_models(
                    a,
                    b,
                    sources,
                    tuple(request.layers),
                    max_pixels=settings.max_image_pixels,
                    max_inputs=settings.max_inputs_per_request,
                )

        return convert.parity_response(await asyncio.to_thread(compare))
