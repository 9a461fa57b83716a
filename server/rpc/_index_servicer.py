"""Thin IndexService servicer: request message -> `IndexManager` call -> response message."""

from __future__ import annotations

import grpc

from embedwarden.v1 import index_pb2, index_pb2_grpc

from ..index import IndexManager
from . import _index_convert as convert
from ._status import rpc_method


class IndexServicer(index_pb2_grpc.IndexServiceServicer):
    def __init__(self, index: IndexManager) -> None:
        self.index = index

    @rpc_method("CreateCollection")
    async def CreateCollection(
        self, request: index_pb2.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.CreateCollectionResponse:
        args = convert.create_args(request, self.index.registry)
        info = await self.index.run_write(lambda: self.index.create(**args))
        return index_pb2.CreateCollectionResponse(collection=convert.collection_info(info))

    @rpc_method("DeleteCollection")
    async def DeleteCollection(
        self, request: index_pb2.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.DeleteCollectionResponse:
        await self.index.run_write(self.index.delete, request.name)
        return index_pb2.DeleteCollectionResponse()

    @rpc_method("ListCollections")
    async def ListCollections(
        self, request: index_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.ListCollectionsResponse:
        infos = await self.index.run(self.index.list_collections)
        return index_pb2.ListCollectionsResponse(
            collections=[convert.collection_info(i) for i in infos]
        )

    @rpc_method("DescribeCollection")
    async def DescribeCollection(
        self, request: index_pb2.DescribeCollectionRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.DescribeCollectionResponse:
        info = await self.index.run(self.index.describe, request.name)
        return index_pb2.DescribeCollectionResponse(collection=convert.collection_info(info))

    @rpc_method("Upsert")
    async def Upsert(
        self, request: index_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.UpsertResponse:
        result = await self.index.upsert(
            request.collection,
            convert.upsert_items(request),
            request.fingerprint,
            convert.cache_mode(request),
        )
        return convert.upsert_response(result)

    @rpc_method("Remove")
    async def Remove(
        self, request: index_pb2.RemoveRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.RemoveResponse:
        result = await self.index.remove(request.collection, list(request.ids))
        return convert.remove_response(result)

    @rpc_method("Search")
    async def Search(
        self, request: index_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> index_pb2.SearchResponse:
        form = convert.result_form(request)
        outcome = await self.index.search(
            request.collection,
            convert.queries(request),
            request.k,
            request.fingerprint,
            convert.overrides(request),
        )
        return convert.search_response(outcome, form)
