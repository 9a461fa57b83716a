"""From a layer's raw output to the served vector: pooling, L2 normalisation, dtype cast.

AVG and MAX reduce the spatial axes a layer has; on a vector layer (e.g. logits) they change
nothing, so that one request can pool `features` and read `logits` together. CLS and TOKEN_MEAN
need a token layer; on a text layer (`masked`) TOKEN_MEAN averages the real tokens only. All
arithmetic is float32; the cast to float16 comes last.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from .._errors import InvalidInput
from ._manifest import LayerSpec


class Pooling(StrEnum):
    DEFAULT = "default"  # avg for spatial maps, none for vectors and tokens
    NONE = "none"
    AVG = "avg"
    MAX = "max"
    CLS = "cls"
    TOKEN_MEAN = "token_mean"


OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


def allowed_poolings(layer: LayerSpec) -> tuple[Pooling, ...]:
    if layer.tokens:
        return (Pooling.NONE, Pooling.CLS, Pooling.TOKEN_MEAN)
    return (Pooling.NONE, Pooling.AVG, Pooling.MAX)


def resolve_pooling(layer: LayerSpec, pooling: Pooling) -> Pooling:
    """The concrete pooling for this layer; raises if the layer cannot be pooled that way."""
    if pooling is Pooling.DEFAULT:
        return Pooling.AVG if layer.spatial_axes and not layer.tokens else Pooling.NONE
    allowed = allowed_poolings(layer)
    if pooling not in allowed:
        names = ", ".join(p.value for p in allowed)
        raise InvalidInput(
            f"layer {layer.name!r} (shape {list(layer.shape)}, layout {layer.layout}) cannot be "
            f"pooled with {pooling.value!r}; it accepts: {names}"
        )
    return pooling


def output_layout(layer: LayerSpec, pooling: Pooling) -> str:
    return layer.layout if pooling is Pooling.NONE else "C"


def pool(array: np.ndarray, layer: LayerSpec, pooling: Pooling) -> np.ndarray:
    """Reduces one item's layer output (shape == layer.shape) as `pooling` says."""
    if pooling is Pooling.NONE or (
        pooling in (Pooling.AVG, Pooling.MAX) and not layer.spatial_axes
    ):
        return array
    pooled: np.ndarray
    if pooling is Pooling.AVG:
        pooled = array.mean(axis=layer.spatial_axes, dtype=np.float32)
    elif pooling is Pooling.MAX:
        pooled = array.max(axis=layer.spatial_axes)
    elif pooling is Pooling.CLS:
        pooled = array[0]
    elif layer.masked:
        # Text: padding rows are exact zeros (a real token's state never is, after LayerNorm).
        real = array[np.any(array != 0, axis=1)]
        pooled = real.mean(axis=0, dtype=np.float32)
    else:
        pooled = array[1:].mean(axis=0, dtype=np.float32)
    return pooled


def finish(
    array: np.ndarray, layer: LayerSpec, pooling: Pooling, normalize: bool, dtype: str
) -> np.ndarray:
    """Pooled, optionally L2-normalised, cast: the exact array that is served and cached."""
    out = pool(np.asarray(array, dtype=np.float32), layer, pooling)
    if normalize:
        norm = np.float32(np.sqrt(np.dot(out.ravel(), out.ravel())))
        out = out / norm if norm > 0 else out
    return np.ascontiguousarray(out, dtype=OUTPUT_DTYPES[dtype])
