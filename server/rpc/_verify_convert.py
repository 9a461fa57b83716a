"""Protobuf messages <-> the Verify use case's types."""

from __future__ import annotations

from embedwarden.v1 import embedding_pb2

from ..verify import DiagnosisState, Verdict, VerifyOptions, VerifyResult
from . import _convert as convert

_VERDICT = {
    Verdict.PASS: embedding_pb2.VERDICT_PASS,
    Verdict.WITHIN_TOLERANCE: embedding_pb2.VERDICT_WITHIN_TOLERANCE,
    Verdict.FAIL: embedding_pb2.VERDICT_FAIL,
}
_DIAGNOSIS = {
    DiagnosisState.NOT_NEEDED: embedding_pb2.DIAGNOSIS_STATE_NOT_NEEDED,
    DiagnosisState.DONE: embedding_pb2.DIAGNOSIS_STATE_DONE,
    DiagnosisState.SKIPPED_BUDGET: embedding_pb2.DIAGNOSIS_STATE_SKIPPED_BUDGET,
    DiagnosisState.NOT_REQUESTED: embedding_pb2.DIAGNOSIS_STATE_NOT_REQUESTED,
}


def verify_options(request: embedding_pb2.VerifyRequest) -> VerifyOptions:
    return VerifyOptions(
        layer=request.layer,
        pooling=convert.enum_value(convert.POOLING, request.pooling, "pooling"),
        normalize=request.normalize,
        pipeline=request.pipeline,
        cache=convert.enum_value(convert.CACHE_MODE, request.cache, "cache"),
        diagnose=not request.skip_diagnosis,
    )


def verify_response(result: VerifyResult) -> embedding_pb2.VerifyResponse:
    items = []
    for item in result.items:
        c = item.comparison
        items.append(
            embedding_pb2.VerifyItem(
                verdict=_VERDICT[c.verdict],
                max_abs_diff=c.max_abs_diff,
                relative_max_abs_diff=c.relative_max_abs_diff,
                cosine=c.cosine,
                cached=item.cached,
                has_classes=c.top1_agrees is not None,
                top1_agrees=bool(c.top1_agrees),
                top5_agreement=c.top5_agreement or 0.0,
                diagnosis_state=_DIAGNOSIS[item.diagnosis_state],
                diagnosis=[
                    embedding_pb2.MistakeMatch(
                        mistake=m.mistake, cosine=m.cosine, reproduces=m.reproduces
                    )
                    for m in item.diagnosis
                ],
            )
        )
    return embedding_pb2.VerifyResponse(
        model=convert.identity(result.identity),
        layer=result.layer,
        pooling=convert.POOLING_TO_PROTO[result.pooling],
        pipeline=result.pipeline,
        verdict=_VERDICT[result.verdict],
        tolerance=result.tolerance,
        items=items,
        failed=result.failed,
        min_cosine=result.min_cosine,
        catalogue=result.catalogue,
        diagnosis_seconds=result.diagnosis_seconds,
    )
