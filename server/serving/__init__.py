"""Serving a model version: loading it (verify, build, warm up, check), the dynamic batcher that
runs its forward passes (narrow, or wide when idle), and the Extract use case (validate, cache,
decode, infer, pool).

Above `models` and `backbones`; below the cache, index, consistency and rpc concerns, which
reach a loaded model only through `ModelManager` and `ExtractionService`.
"""

from ._batching import ItemOutput
from ._extraction import (
    BACKGROUND_CHUNK,
    CacheHit,
    CacheMode,
    Embedding,
    EmbeddingCache,
    ExtractionService,
    ExtractOptions,
    ExtractResult,
    InputSource,
    input_digest,
)
from ._manager import LoadedModel, ModelIdentity, ModelManager, ModelState, model_folder
from ._widening import WidePasses

__all__ = [
    "BACKGROUND_CHUNK",
    "CacheHit",
    "CacheMode",
    "Embedding",
    "EmbeddingCache",
    "ExtractOptions",
    "ExtractResult",
    "ExtractionService",
    "InputSource",
    "ItemOutput",
    "LoadedModel",
    "ModelIdentity",
    "ModelManager",
    "ModelState",
    "WidePasses",
    "input_digest",
    "model_folder",
]
