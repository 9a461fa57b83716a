"""Client methods for the embedding cache (AdminService.GetCacheStats / PurgeCache)."""

from __future__ import annotations

from embedwarden.v1 import admin_pb2, types_pb2

from ._base import ClientBase


class CacheAPI(ClientBase):
    def cache_stats(self) -> admin_pb2.GetCacheStatsResponse:
        """Entries, bytes used and bound, hits/misses/corrupt/evictions since the server
        started, queued writes, and entries per model version."""
        response: admin_pb2.GetCacheStatsResponse = self._call(
            self._admin.GetCacheStats, admin_pb2.GetCacheStatsRequest()
        )
        return response

    def purge_cache(self, model: str | None = None) -> int:
        """Deletes every cache entry, or only those of `model` ("NAME@VERSION"); returns how
        many were removed. Other versions' entries are untouched."""
        request = admin_pb2.PurgeCacheRequest()
        if model is not None:
            name, sep, version = model.partition("@")
            if not sep or not name or not version:
                raise ValueError(f"purge one version at a time: NAME@VERSION, got {model!r}")
            request.model.CopyFrom(types_pb2.ModelRef(name=name, version=version))
        response: admin_pb2.PurgeCacheResponse = self._call(
            self._admin.PurgeCache, request, timeout=max(self.timeout, 600.0)
        )
        return int(response.removed)
