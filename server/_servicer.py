"""Thin gRPC servicers: request message -> domain call -> response message.

Error mapping and request metrics come from the `rpc_method` decorators; validation and all real
work live in the domain modules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from embedwarden.v1 import admin_pb2, admin_pb2_grpc, embedding_pb2, embedding_pb2_grpc

from . import _convert as convert
from . import _parity as parity
from ._errors import EmbedwardenError, FailedPrecondition, InvalidInput
from ._rpc_errors import describe, rpc_method, rpc_stream_method

if TYPE_CHECKING:
    from ._app import Application

log = logging.getLogger(__name__)

STREAM_WINDOW = 4  # stream messages processed concurrently; responses stay in order
MAX_PING_RESPONSE_BYTES = 16 * 1024 * 1024


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, app: Application) -> None:
        self.app = app

    async def _extract(
        self, request: embedding_pb2.ExtractRequest
    ) -> embedding_pb2.ExtractResponse:
        name, version = convert.model_ref(request.model)
        options = convert.extract_options(request)
        sources = convert.image_sources(request.inputs)
        result = await self.app.extraction.extract(name, version, sources, options)
        return convert.extract_response(result)

    @rpc_method("Extract")
    async def Extract(
        self, request: embedding_pb2.ExtractRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.ExtractResponse:
        return await self._extract(request)

    async def _stream_one(
        self, message: embedding_pb2.ExtractStreamRequest
    ) -> embedding_pb2.ExtractStreamResponse:
        try:
            response = await self._extract(message.request)
            return embedding_pb2.ExtractStreamResponse(
                request_id=message.request_id, response=response
            )
        except (EmbedwardenError, Exception) as exc:
            code, text = describe(exc)
            return embedding_pb2.ExtractStreamResponse(
                request_id=message.request_id,
                error=embedding_pb2.StreamError(code=code.value[0], message=text),
            )

    @rpc_stream_method("ExtractStream")
    async def ExtractStream(
        self,
        request_iterator: AsyncIterator[embedding_pb2.ExtractStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[embedding_pb2.ExtractStreamResponse]:
        async with self.app.stream_slot(context):
            queue: asyncio.Queue[asyncio.Task[embedding_pb2.ExtractStreamResponse] | None]
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
            models=[self.app.model_summary(m) for m in self.app.registry.all()]
        )

    @rpc_method("DescribeModel")
    async def DescribeModel(
        self, request: embedding_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.DescribeModelResponse:
        name, version = convert.model_ref(request.model)
        manifest = self.app.registry.resolve(name, version)
        return convert.describe_model(manifest, self.app.model_summary(manifest), self.app.device)

    @rpc_method("Ping")
    async def Ping(
        self, request: embedding_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.PingResponse:
        if request.response_bytes > MAX_PING_RESPONSE_BYTES:
            raise InvalidInput(f"response_bytes is limited to {MAX_PING_RESPONSE_BYTES}")
        return embedding_pb2.PingResponse(payload=bytes(request.response_bytes))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: Application) -> None:
        self.app = app

    @rpc_method("LoadModel")
    async def LoadModel(
        self, request: admin_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.LoadModelResponse:
        name, version = convert.model_ref(request.model)
        model = await asyncio.to_thread(self.app.models.load, name, version)
        return admin_pb2.LoadModelResponse(
            model=self.app.model_summary(model.manifest), load_seconds=model.load_seconds
        )

    @rpc_method("UnloadModel")
    async def UnloadModel(
        self, request: admin_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UnloadModelResponse:
        name, version = convert.model_ref(request.model)
        identity = await asyncio.to_thread(
            self.app.models.unload, name, version, self.app.settings.grace_s
        )
        return admin_pb2.UnloadModelResponse(model=convert.identity(identity))

    @rpc_method("GetCacheStats")
    async def GetCacheStats(
        self, request: admin_pb2.GetCacheStatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetCacheStatsResponse:
        cache = self.app.cache
        if cache is None:
            return admin_pb2.GetCacheStatsResponse(enabled=False)
        stats = await asyncio.to_thread(cache.stats)
        return convert.cache_stats(stats, self.app.registry)

    @rpc_method("PurgeCache")
    async def PurgeCache(
        self, request: admin_pb2.PurgeCacheRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PurgeCacheResponse:
        cache = self.app.cache
        if cache is None:
            raise FailedPrecondition("this server runs without a cache (--cache false)")
        fingerprint = None
        if request.HasField("model"):
            name, version = convert.model_ref(request.model)
            if not version:
                raise InvalidInput(
                    f"purge one version at a time: give NAME@VERSION, not {name!r} alone"
                )
            fingerprint = self.app.registry.resolve(name, version).fingerprint()
        removed = await asyncio.to_thread(cache.purge, fingerprint)
        return admin_pb2.PurgeCacheResponse(removed=removed)

    @rpc_method("CheckConsistency")
    async def CheckConsistency(
        self, request: admin_pb2.CheckConsistencyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CheckConsistencyResponse:
        monitor = self.app.monitor
        if monitor is None:
            raise FailedPrecondition("this server runs without the consistency monitor")
        name, version = convert.model_ref(request.model, required=False)
        result = await asyncio.to_thread(monitor.check, name, version)
        return convert.consistency_report(result)

    @rpc_method("CompareModels")
    async def CompareModels(
        self, request: admin_pb2.CompareModelsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CompareModelsResponse:
        a = self.app.models.get(*convert.model_ref(request.model_a, what="model_a"))
        b = self.app.models.get(*convert.model_ref(request.model_b, what="model_b"))
        settings = self.app.settings
        sources = convert.image_sources(request.inputs)

        def compare() -> parity.ParityReport:
            with a.use(), b.use():  # an unload waits for the comparison to finish
                return parity.compare_models(
                    a,
                    b,
                    sources,
                    tuple(request.layers),
                    max_pixels=settings.max_image_pixels,
                    max_inputs=settings.max_inputs_per_request,
                )

        return convert.parity_response(await asyncio.to_thread(compare))
