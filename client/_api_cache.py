"""Client methods for the embedding cache (AdminService.GetCacheStats / PurgeCache)."""

from __future__ import annotations

from ._base import ClientBase


class CacheAPI(ClientBase):
    pass
