"""The LMDB embedding cache: content-addressed keys, checksummed entries, group commits off the
request path, bounded with an approximate LRU.

`LmdbCache` implements `serving.EmbeddingCache`; the cache knows nothing about models beyond a
fingerprint prefix in each key. Modules: `_format` (keys and entries, pure functions), `_db`
(the LMDB database), `_writer` (group commits), `_lmdb` (the cache the server uses).
"""

from ._lmdb import CacheStats, LmdbCache, open_cache, verify_cache

__all__ = ["CacheStats", "LmdbCache", "open_cache", "verify_cache"]
