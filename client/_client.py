"""`Client`: a blocking Python client for the Embedwarden service (embeddings and models here;
cache, index, consistency, parity and verify methods come from the `_api_*` mixins, which share the
request types of `_types` with it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from embedwarden.v1 import admin_pb2, embedding_pb2

from ._api_cache import CacheAPI
from ._api_consistency import ConsistencyAPI
from ._api_index import IndexAPI
from ._api_parity import ParityAPI
from ._api_verify import VerifyAPI
from ._base import ClientBase, default_address
from ._exceptions import FailedPrecondition, from_rpc_error, from_status
from ._types import (
    CACHE_MODES,
    DTYPES,
    POOLINGS,
    ImageLike,
    ModelIdentity,
    Text,
    image_input,
    model_ref,
)
from .tensor import to_array

__all__ = ["Client", "Extraction", "ModelIdentity", "default_address", "image_input"]


@dataclass(frozen=True)
class Extraction:
    """Embeddings of one request, stacked per layer in input order."""

    model: ModelIdentity
    arrays: dict[str, np.ndarray]  # layer -> [n_inputs, *shape]
    layouts: dict[str, str]
    cached: dict[str, np.ndarray]  # layer -> bool per input
    timings: dict[str, float]

    @property
    def array(self) -> np.ndarray:
        """The only layer's array (raises if several layers were requested)."""
        if len(self.arrays) != 1:
            raise ValueError(f"several layers were extracted: {list(self.arrays)}")
        return next(iter(self.arrays.values()))

    def __getitem__(self, layer: str) -> np.ndarray:
        return self.arrays[layer]

    @classmethod
    def from_proto(cls, response: embedding_pb2.ExtractResponse) -> Extraction:
        layers = [e.layer for e in response.items[0].embeddings] if response.items else []
        arrays: dict[str, np.ndarray] = {}
        cached: dict[str, np.ndarray] = {}
        layouts: dict[str, str] = {}
        for j, layer in enumerate(layers):
            rows = [item.embeddings[j] for item in response.items]
            arrays[layer] = np.stack([to_array(r.embedding) for r in rows])
            cached[layer] = np.array([r.cached for r in rows], dtype=bool)
            layouts[layer] = rows[0].layout
        t = response.timings
        timings = {
            "cache": t.cache_seconds,
            "queue": t.queue_seconds,
            "preprocess": t.preprocess_seconds,
            "inference": t.inference_seconds,
            "total": t.total_seconds,
        }
        return cls(ModelIdentity.from_proto(response.model), arrays, layouts, cached, timings)


class Client(CacheAPI, IndexAPI, ConsistencyAPI, ParityAPI, VerifyAPI, ClientBase):
    """Blocking client. Use as a context manager, or call `close()`.

    Retries: UNAVAILABLE is retried by gRPC itself (see `_base`). Errors are the typed
    exceptions of `embedwarden.client`."""

    # --- embeddings -------------------------------------------------------------------

    def _extract_request(
        self,
        images: Sequence[ImageLike],
        model: str,
        version: str,
        layers: str | Sequence[str] | None,
        pooling: str,
        dtype: str,
        normalize: bool,
        cache: str,
        expect_fingerprint: str = "",
    ) -> embedding_pb2.ExtractRequest:
        layer_list = [layers] if isinstance(layers, str) else list(layers or [])
        for what, value, table in (
            ("pooling", pooling, POOLINGS),
            ("dtype", dtype, DTYPES),
            ("cache", cache, CACHE_MODES),
        ):
            if value not in table:
                raise ValueError(f"{what} must be one of {sorted(table)}, got {value!r}")
        return embedding_pb2.ExtractRequest(
            model=model_ref(model, version, expect_fingerprint),
            layers=layer_list,
            pooling=POOLINGS[pooling],
            dtype=DTYPES[dtype],
            normalize=normalize,
            inputs=[image_input(i) for i in images],
            cache=CACHE_MODES[cache],
        )

    def extract(
        self,
        images: Sequence[ImageLike],
        model: str,
        *,
        version: str = "",
        layers: str | Sequence[str] | None = None,
        pooling: str = "default",
        dtype: str = "float32",
        normalize: bool = False,
        cache: str = "on",
        timeout: float | None = None,
        expect_fingerprint: str = "",
    ) -> Extraction:
        """Embeds `images` (bytes, paths or uint8 RGB arrays); arrays come back in input order.

        `model` may be "name" or "name@version"; the result names the exact version used.
        `expect_fingerprint` pins it: another fingerprint raises FailedPrecondition."""
        request = self._extract_request(
            images, model, version, layers, pooling, dtype, normalize, cache, expect_fingerprint
        )
        result = Extraction.from_proto(self._call(self._embedding.Extract, request, timeout))
        return _checked(result, expect_fingerprint)

    def extract_text(self, texts: Sequence[str], model: str, **options: Any) -> Extraction:
        """Embeds `texts` with a text model (same options as `extract`)."""
        return self.extract([Text(t) for t in texts], model, **options)

    def extract_stream(
        self,
        images: Iterable[ImageLike],
        model: str,
        *,
        batch_size: int = 32,
        version: str = "",
        layers: str | Sequence[str] | None = None,
        pooling: str = "default",
        dtype: str = "float32",
        normalize: bool = False,
        cache: str = "on",
        timeout: float | None = None,
        expect_fingerprint: str = "",
    ) -> Iterator[Extraction]:
        """Bulk extraction over one bidirectional stream: yields one Extraction per chunk of
        `batch_size` inputs, in order. A failing chunk raises its typed error."""

        def chunks() -> Iterator[list[ImageLike]]:
            chunk: list[ImageLike] = []
            for image in images:
                chunk.append(image)
                if len(chunk) >= batch_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        def requests() -> Iterator[embedding_pb2.ExtractStreamRequest]:
            for i, chunk in enumerate(chunks()):
                yield embedding_pb2.ExtractStreamRequest(
                    request_id=str(i),
                    request=self._extract_request(
                        chunk,
                        model,
                        version,
                        layers,
                        pooling,
                        dtype,
                        normalize,
                        cache,
                        expect_fingerprint,
                    ),
                )

        try:
            responses = self._embedding.ExtractStream(
                requests(), timeout=timeout, metadata=self._metadata
            )
            for message in responses:
                if message.HasField("error"):
                    raise from_status(
                        message.error.code, f"chunk {message.request_id}: {message.error.message}"
                    )
                yield _checked(Extraction.from_proto(message.response), expect_fingerprint)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def ping(self, payload: bytes = b"", response_bytes: int = 0) -> bytes:
        request = embedding_pb2.PingRequest(payload=payload, response_bytes=response_bytes)
        return bytes(self._call(self._embedding.Ping, request).payload)

    # --- models -----------------------------------------------------------------------

    def list_models(self) -> list[embedding_pb2.ModelSummary]:
        return list(
            self._call(self._embedding.ListModels, embedding_pb2.ListModelsRequest()).models
        )

    def describe_model(
        self, model: str, version: str = "", *, expect_fingerprint: str = ""
    ) -> embedding_pb2.DescribeModelResponse:
        request = embedding_pb2.DescribeModelRequest(
            model=model_ref(model, version, expect_fingerprint)
        )
        response: embedding_pb2.DescribeModelResponse = self._call(
            self._embedding.DescribeModel, request
        )
        return response

    def load_model(
        self,
        model: str,
        version: str = "",
        timeout: float | None = 600.0,
        *,
        expect_fingerprint: str = "",
    ) -> admin_pb2.LoadModelResponse:
        request = admin_pb2.LoadModelRequest(model=model_ref(model, version, expect_fingerprint))
        response: admin_pb2.LoadModelResponse = self._call(self._admin.LoadModel, request, timeout)
        return response

    def unload_model(
        self, model: str, version: str = "", *, expect_fingerprint: str = ""
    ) -> admin_pb2.UnloadModelResponse:
        request = admin_pb2.UnloadModelRequest(model=model_ref(model, version, expect_fingerprint))
        response: admin_pb2.UnloadModelResponse = self._call(self._admin.UnloadModel, request)
        return response


def _checked(result: Extraction, expect_fingerprint: str) -> Extraction:
    """The server enforces a pin; this also refuses a server too old to know the field."""
    expected = expect_fingerprint.strip().lower()
    if expected and result.model.fingerprint != expected:
        raise FailedPrecondition(
            f"{result.model.name}@{result.model.version} answered with fingerprint "
            f"{result.model.fingerprint}, but the request pins {expected}"
        )
    return result
