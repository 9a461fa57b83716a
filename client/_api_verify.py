"""Client methods for verifying a pipeline's own vectors (EmbeddingService.Verify)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from embedwarden.v1 import embedding_pb2

from ._base import ClientBase
from ._types import CACHE_MODES, POOLINGS, ImageLike, ModelIdentity, image_input, model_ref
from .tensor import encode, field_number, message_field, tensor_field

_EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]

VERDICTS = {
    embedding_pb2.VERDICT_PASS: "pass",
    embedding_pb2.VERDICT_WITHIN_TOLERANCE: "within_tolerance",
    embedding_pb2.VERDICT_FAIL: "fail",
}
DIAGNOSIS_STATES = {
    embedding_pb2.DIAGNOSIS_STATE_NOT_NEEDED: "not_needed",
    embedding_pb2.DIAGNOSIS_STATE_DONE: "done",
    embedding_pb2.DIAGNOSIS_STATE_SKIPPED_BUDGET: "skipped_budget",
    embedding_pb2.DIAGNOSIS_STATE_NOT_REQUESTED: "not_requested",
}
_POOLING_NAMES = {v: k for k, v in POOLINGS.items()}


@dataclass(frozen=True)
class MistakeMatch:
    mistake: str  # a catalogue name ("bgr", "imagenet_norm", ...), or two joined by "+"
    cosine: float
    reproduces: bool


@dataclass(frozen=True)
class VerifiedVector:
    verdict: str  # pass (bit-identical), within_tolerance, fail
    cosine: float
    max_abs_diff: float
    relative_max_abs_diff: float
    cached: bool
    top1_agrees: bool | None  # class layers only
    top5_agreement: float | None
    diagnosis_state: str  # not_needed, done, skipped_budget, not_requested
    diagnosis: tuple[MistakeMatch, ...]  # best first

    @property
    def mistake(self) -> str | None:
        """The catalogued mistake that reproduces this vector best, if any does."""
        best = self.diagnosis[0] if self.diagnosis else None
        return best.mistake if best is not None and best.reproduces else None


@dataclass(frozen=True)
class VerifyReport:
    model: ModelIdentity
    layer: str
    pooling: str
    pipeline: str
    verdict: str  # the worst item's
    tolerance: str
    items: tuple[VerifiedVector, ...]
    min_cosine: float
    catalogue: tuple[str, ...]
    diagnosis_seconds: float

    @property
    def failed(self) -> int:
        return sum(item.verdict == "fail" for item in self.items)

    @property
    def passed(self) -> bool:
        return self.verdict != "fail"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_proto(cls, response: embedding_pb2.VerifyResponse) -> VerifyReport:
        items = tuple(
            VerifiedVector(
                verdict=VERDICTS.get(i.verdict, "unspecified"),
                cosine=i.cosine,
                max_abs_diff=i.max_abs_diff,
                relative_max_abs_diff=i.relative_max_abs_diff,
                cached=i.cached,
                top1_agrees=i.top1_agrees if i.has_classes else None,
                top5_agreement=i.top5_agreement if i.has_classes else None,
                diagnosis_state=DIAGNOSIS_STATES.get(i.diagnosis_state, "unspecified"),
                diagnosis=tuple(
                    MistakeMatch(m.mistake, m.cosine, m.reproduces) for m in i.diagnosis
                ),
            )
            for i in response.items
        )
        return cls(
            model=ModelIdentity.from_proto(response.model),
            layer=response.layer,
            pooling=_POOLING_NAMES.get(response.pooling, "default"),
            pipeline=response.pipeline,
            verdict=VERDICTS.get(response.verdict, "unspecified"),
            tolerance=response.tolerance,
            items=items,
            min_cosine=response.min_cosine,
            catalogue=tuple(response.catalogue),
            diagnosis_seconds=response.diagnosis_seconds,
        )


class VerifyAPI(ClientBase):
    def verify(
        self,
        images: Sequence[ImageLike],
        vectors: np.ndarray | Sequence[np.ndarray],
        model: str,
        *,
        version: str = "",
        layer: str = "",
        pooling: str = "default",
        normalize: bool = False,
        pipeline: str = "",
        cache: str = "on",
        diagnose: bool = True,
        expect_fingerprint: str = "",
        timeout: float | None = None,
    ) -> VerifyReport:
        """Checks the vectors your pipeline made for `images` (one row per image, in order)
        against the server's reference for `model`; failing rows are diagnosed against the
        catalogue of known preprocessing mistakes. `expect_fingerprint` pins the version: a
        server whose version has another fingerprint raises FailedPrecondition."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {sorted(CACHE_MODES)}, got {cache!r}")
        # float64 (numpy's default) is sent as float32, the precision the server computes in.
        rows = [
            np.ascontiguousarray(v, np.float32 if v.dtype == np.float64 else v.dtype)
            for v in (np.asarray(v) for v in vectors)
        ]
        request = embedding_pb2.VerifyRequest(
            model=model_ref(model, version, expect_fingerprint),
            layer=layer,
            pooling=POOLINGS[pooling],
            normalize=normalize,
            pipeline=pipeline,
            cache=CACHE_MODES[cache],
            skip_diagnosis=not diagnose,
        )
        # Inputs and vectors are spliced into the request's wire form (see tensor.encode): a
        # request of 256 vectors and 256 small JPEGs cost 19 ms as one message, 5 ms spliced.
        inputs, vectors_no = field_number(request, "inputs"), field_number(request, "vectors")
        payload = encode(
            request,
            *(message_field(inputs, [image_input(i).SerializeToString()]) for i in images),
            *(tensor_field(vectors_no, v) for v in rows),
        )
        method = self._encoded(_EMBEDDING_SERVICE, "Verify", embedding_pb2.VerifyResponse)
        return VerifyReport.from_proto(self._call(method, payload, timeout))
