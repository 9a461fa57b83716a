"""Protobuf messages <-> domain types. The servicers call these and nothing else does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from embedwarden.client.tensor import DTYPE_NAMES, TensorError, to_array
from embedwarden.v1 import admin_pb2, embedding_pb2, types_pb2

from .._errors import InvalidInput
from ..cache import CacheStats
from ..consistency import ParityReport, Report
from ..models import (
    Manifest,
    Pooling,
    RawImage,
    Registry,
    TextInput,
    allowed_poolings,
    decode_table,
    parse_fingerprint,
)
from ..serving import (
    CacheMode,
    ExtractOptions,
    ExtractResult,
    InputSource,
    ModelIdentity,
    ModelState,
)
from ._wire import encode_items

E = TypeVar("E")

POOLING = {
    types_pb2.POOLING_UNSPECIFIED: Pooling.DEFAULT,
    types_pb2.POOLING_NONE: Pooling.NONE,
    types_pb2.POOLING_AVG: Pooling.AVG,
    types_pb2.POOLING_MAX: Pooling.MAX,
    types_pb2.POOLING_CLS: Pooling.CLS,
    types_pb2.POOLING_TOKEN_MEAN: Pooling.TOKEN_MEAN,
}
POOLING_TO_PROTO = {v: k for k, v in POOLING.items()}
_OUTPUT_DTYPE = {
    types_pb2.DTYPE_UNSPECIFIED: "float32",
    types_pb2.DTYPE_FLOAT32: "float32",
    types_pb2.DTYPE_FLOAT16: "float16",
}
CACHE_MODE = {
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


def enum_value(table: Mapping[Any, E], value: int, what: str) -> E:
    """A protobuf enum value through its table; an unknown number is the caller's mistake."""
    try:
        return table[value]
    except KeyError:
        raise InvalidInput(f"{what}: unknown value {value}") from None


def model_ref(
    ref: types_pb2.ModelRef, registry: Registry, *, required: bool = True, what: str = "model"
) -> tuple[str, str]:
    """(name, version) of a ModelRef. Every RPC that takes a ModelRef comes through here, so
    this is where its `fingerprint` pin is enforced: a pinned ref resolves to its exact version
    now (FingerprintMismatch, i.e. FAILED_PRECONDITION, naming both when the server's version
    has another fingerprint; INVALID_ARGUMENT when the pin is not 64 hex digits)."""
    if required and not ref.name:
        raise InvalidInput(f"{what}.name is required (see ListModels for the registered models)")
    if not ref.fingerprint:
        return ref.name, ref.version
    if not ref.name:
        raise InvalidInput(f"{what}.fingerprint pins a model: give {what}.name too")
    fingerprint = parse_fingerprint(ref.fingerprint, f"{what}.fingerprint")
    manifest = registry.resolve(ref.name, ref.version, fingerprint)
    return manifest.name, manifest.version


def image_source(message: types_pb2.Input, index: int) -> InputSource:
    kind = message.WhichOneof("source")
    if kind == "text":
        return TextInput(message.text)
    if kind == "encoded":
        return message.encoded
    if kind == "raw":
        raw = message.raw
        return RawImage(
            raw.data,
            tuple(int(d) for d in raw.shape),
            DTYPE_NAMES.get(raw.dtype, f"dtype#{raw.dtype}"),
        )
    raise InvalidInput(
        f"inputs[{index}]: set either `encoded` bytes or a `raw` array (`text` for text models)"
    )


def image_sources(messages: Sequence[types_pb2.Input]) -> list[InputSource]:
    return [image_source(m, i) for i, m in enumerate(messages)]


def extract_options(request: embedding_pb2.ExtractRequest) -> ExtractOptions:
    pooling = enum_value(POOLING, request.pooling, "pooling")
    dtype = enum_value(_OUTPUT_DTYPE, request.dtype, "dtype (float32 or float16)")
    cache = enum_value(CACHE_MODE, request.cache, "cache")
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


def extract_response(result: ExtractResult) -> bytes:
    """The ExtractResponse in wire form: its small fields serialized, then the items spliced
    (`_wire`; answered as it is, see `_register`)."""
    t = result.timings
    head = embedding_pb2.ExtractResponse(
        model=identity(result.identity),
        timings=embedding_pb2.Timings(
            cache_seconds=t.cache,
            queue_seconds=t.queue,
            preprocess_seconds=t.preprocess,
            inference_seconds=t.inference,
            total_seconds=t.total,
        ),
    )
    return encode_items(result.items, head.SerializeToString())


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
    t = manifest.tokenizer
    response = embedding_pb2.DescribeModelResponse(
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
            decoding=embedding_pb2.Decoding(**decode_table(p.decode)),
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
    if t is not None:  # a text model: its tokenizer instead of image preprocessing
        response.ClearField("preprocessing")
        response.tokenization.CopyFrom(
            embedding_pb2.Tokenization(
                lowercase=t.lowercase,
                max_length=t.max_length,
                truncation_side=t.truncation_side,
                pooling=t.pooling,
                normalize=t.normalize,
                files=dict(t.files),
            )
        )
    return response


def cache_stats(stats: CacheStats, registry: Registry) -> admin_pb2.GetCacheStatsResponse:
    models = []
    for fingerprint, entries in stats.versions:
        manifest = registry.by_fingerprint(fingerprint)
        models.append(
            admin_pb2.CacheModelStats(
                fingerprint=fingerprint,
                model=manifest.ref if manifest is not None else "",
                entries=entries,
            )
        )
    return admin_pb2.GetCacheStatsResponse(
        enabled=stats.enabled,
        entries=stats.entries,
        used_bytes=stats.used_bytes,
        max_bytes=stats.max_bytes,
        hits=stats.hits,
        misses=stats.misses,
        corrupt=stats.corrupt,
        evictions=stats.evictions,
        pending_writes=stats.pending_writes,
        models=models,
        path=stats.path,
    )


def parity_response(report: ParityReport) -> admin_pb2.CompareModelsResponse:
    return admin_pb2.CompareModelsResponse(
        model_a=identity(report.model_a),
        model_b=identity(report.model_b),
        preprocess_max_abs_diff=report.preprocess_max_abs_diff,
        layers=[
            admin_pb2.LayerParity(
                layer=p.layer,
                max_abs_diff=p.max_abs_diff,
                min_cosine=p.min_cosine,
                mean_cosine=p.mean_cosine,
                top1_agreement=p.top1_agreement,
                retrieval_overlap=p.retrieval_overlap,
                retrieval_min_overlap=p.retrieval_min_overlap,
            )
            for p in report.layers
        ],
        first_divergence=report.first_divergence,
        inputs=report.inputs,
    )


def consistency_report(report: Report) -> admin_pb2.CheckConsistencyResponse:
    return admin_pb2.CheckConsistencyResponse(
        passed=report.passed,
        results=[
            admin_pb2.CheckResult(
                model=identity(o.identity),
                check=o.check,
                layer=o.layer,
                passed=o.passed,
                max_abs_diff=o.max_abs_diff,
                min_cosine=o.min_cosine,
                tolerance_abs=o.atol,
                tolerance_rel=o.rtol,
                detail=o.detail,
                checked_at=o.checked_at,
            )
            for o in report.results
        ],
    )
