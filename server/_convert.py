"""Protobuf messages <-> domain types. The servicers call these and nothing else does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from embedwarden.client._tensor import DTYPE_NAMES, TensorError, to_array
from embedwarden.v1 import embedding_pb2, types_pb2

from ._errors import InvalidInput
from ._extraction import CacheMode, Embedding, ExtractOptions, ExtractResult
from ._manifest import Manifest
from ._models import ModelIdentity, ModelState
from ._postprocess import Pooling, allowed_poolings
from ._preprocess import ImageSource, RawImage

E = TypeVar("E")

_POOLING = {
    types_pb2.POOLING_UNSPECIFIED: Pooling.DEFAULT,
    types_pb2.POOLING_NONE: Pooling.NONE,
    types_pb2.POOLING_AVG: Pooling.AVG,
    types_pb2.POOLING_MAX: Pooling.MAX,
    types_pb2.POOLING_CLS: Pooling.CLS,
    types_pb2.POOLING_TOKEN_MEAN: Pooling.TOKEN_MEAN,
}
POOLING_TO_PROTO = {v: k for k, v in _POOLING.items()}
_OUTPUT_DTYPE = {
    types_pb2.DTYPE_UNSPECIFIED: "float32",
    types_pb2.DTYPE_FLOAT32: "float32",
    types_pb2.DTYPE_FLOAT16: "float16",
}
_DTYPE_TO_PROTO = {"float32": types_pb2.DTYPE_FLOAT32, "float16": types_pb2.DTYPE_FLOAT16}
_CACHE = {
    types_pb2.CACHE_MODE_UNSPECIFIED: CacheMode.ON,
    types_pb2.CACHE_MODE_ON: CacheMode.ON,
    types_pb2.CACHE_MODE_OFF: CacheMode.OFF,
    types_pb2.CACHE_MODE_REFRESH: CacheMode.REFRESH,
}
_STATE = {
    ModelState.AVAILABLE: embedding_pb2.MODEL_STATE_AVAILABLE,
    ModelState.LOADING: embedding_pb2.MODEL_STATE_LOADING,
    ModelState.SERVING: embedding_pb2.MODEL_STATE_SERVING,
    ModelState.FAILED: embedding_pb2.MODEL_STATE_FAILED,
}


def _enum(table: Mapping[Any, E], value: int, what: str) -> E:
    try:
        return table[value]
    except KeyError:
        raise InvalidInput(f"{what}: unknown value {value}") from None


def model_ref(ref: types_pb2.ModelRef, required: bool = True) -> tuple[str, str]:
    if required and not ref.name:
        raise InvalidInput("model.name is required (see ListModels for the registered models)")
    return ref.name, ref.version


def image_source(message: types_pb2.Input, index: int) -> ImageSource:
    kind = message.WhichOneof("source")
    if kind == "encoded":
        return message.encoded
    if kind == "raw":
        raw = message.raw
        return RawImage(
            raw.data,
            tuple(int(d) for d in raw.shape),
            DTYPE_NAMES.get(raw.dtype, f"dtype#{raw.dtype}"),
        )
    raise InvalidInput(f"inputs[{index}]: set either `encoded` bytes or a `raw` array")


def image_sources(messages: Sequence[types_pb2.Input]) -> list[ImageSource]:
    return [image_source(m, i) for i, m in enumerate(messages)]


def extract_options(request: embedding_pb2.ExtractRequest) -> ExtractOptions:
    pooling = _enum(_POOLING, request.pooling, "pooling")
    dtype = _enum(_OUTPUT_DTYPE, request.dtype, "dtype (float32 or float16)")
    cache = _enum(_CACHE, request.cache, "cache")
    return ExtractOptions(
        layers=tuple(request.layers),
        pooling=pooling,
        dtype=dtype,
        normalize=request.normalize,
        cache=cache,
    )


def vector(message: types_pb2.Tensor, what: str) -> np.ndarray:
    try:
        return to_array(message)
    except TensorError as exc:
        raise InvalidInput(f"{what}: {exc}") from None


def identity(ident: ModelIdentity) -> types_pb2.ModelIdentity:
    return types_pb2.ModelIdentity(
        name=ident.name,
        version=ident.version,
        fingerprint=ident.fingerprint,
        weights_sha256=ident.weights_sha256,
    )


def _embedding(e: Embedding) -> embedding_pb2.LayerEmbedding:
    little = e.array.astype(e.array.dtype.newbyteorder("<"), copy=False)
    return embedding_pb2.LayerEmbedding(
        layer=e.layer,
        embedding=types_pb2.Tensor(
            data=little.tobytes(),
            shape=e.array.shape,
            dtype=_DTYPE_TO_PROTO[e.array.dtype.name],
        ),
        layout=e.layout,
        cached=e.cached,
    )


def extract_response(result: ExtractResult) -> embedding_pb2.ExtractResponse:
    t = result.timings
    return embedding_pb2.ExtractResponse(
        model=identity(result.identity),
        items=[
            embedding_pb2.ExtractItem(embeddings=[_embedding(e) for e in row])
            for row in result.items
        ],
        timings=embedding_pb2.Timings(
            cache_seconds=t.cache,
            queue_seconds=t.queue,
            preprocess_seconds=t.preprocess,
            inference_seconds=t.inference,
            total_seconds=t.total,
        ),
    )


def model_summary(
    manifest: Manifest, state: ModelState, detail: str, is_default: bool
) -> embedding_pb2.ModelSummary:
    return embedding_pb2.ModelSummary(
        identity=identity(ModelIdentity.of(manifest)),
        framework=manifest.framework,
        architecture=manifest.architecture.builder,
        is_default_version=is_default,
        state=_STATE[state],
        state_detail=detail,
        default_layer=manifest.default_layer,
    )


def describe_model(
    manifest: Manifest, summary: embedding_pb2.ModelSummary, device: str
) -> embedding_pb2.DescribeModelResponse:
    p = manifest.preprocess
    return embedding_pb2.DescribeModelResponse(
        summary=summary,
        layers=[
            embedding_pb2.LayerInfo(
                name=layer.name,
                shape=layer.shape,
                layout=layer.layout,
                poolings=[POOLING_TO_PROTO[x] for x in allowed_poolings(layer)],
            )
            for layer in manifest.layers
        ],
        preprocessing=embedding_pb2.Preprocessing(
            decoder=p.decoder,
            color_order=p.color_order,
            resize_mode=p.resize_mode,
            resize_size=p.resize_size,
            crop_fraction=p.crop_fraction,
            size=p.size,
            interpolation=p.interpolation,
            antialias=p.antialias,
            divisor=p.divisor,
            mean=p.mean,
            std=p.std,
            layout=p.layout,
        ),
        dtype=manifest.numerics.dtype,
        deterministic=manifest.numerics.deterministic,
        weights_file=manifest.weights.file,
        license=manifest.license,
        source=manifest.source,
        description=manifest.description,
        manifest=manifest.text,
        device=device,
    )
