"""Judging one submitted vector against the reference: differences, cosine, class agreement and
a verdict under the manifest's consistency tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ..consistency import Tolerance, cosines


class Verdict(StrEnum):
    PASS = "pass"  # bit-identical to the reference
    WITHIN_TOLERANCE = "within_tolerance"  # differs by no more than batch rounding
    FAIL = "fail"


SEVERITY = {Verdict.PASS: 0, Verdict.WITHIN_TOLERANCE: 1, Verdict.FAIL: 2}


@dataclass(frozen=True)
class ItemComparison:
    verdict: Verdict
    max_abs_diff: float
    relative_max_abs_diff: float  # max |d| / max |reference|
    cosine: float
    top1_agrees: bool | None = None  # class layers only
    top5_agreement: float | None = None  # share of the reference's top-5 in the submitted top-5


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cosines(a.reshape(1, -1), b.reshape(1, -1))[0])


def compare_item(
    submitted: np.ndarray, reference: np.ndarray, tolerance: Tolerance, classes: bool
) -> ItemComparison:
    """`submitted` and `reference` have the same shape (checked by the caller)."""
    if submitted.dtype == reference.dtype and submitted.tobytes() == reference.tobytes():
        verdict = Verdict.PASS
        max_abs, scale, cos = 0.0, float(np.max(np.abs(reference), initial=0.0)), 1.0
    else:
        a = submitted.astype(np.float64).ravel()
        b = reference.astype(np.float64).ravel()
        max_abs = float(np.max(np.abs(a - b), initial=0.0))
        scale = float(np.max(np.abs(b), initial=0.0))
        cos = cosine(a, b)
        failed = tolerance.exceeded(max_abs, scale, cos)
        verdict = Verdict.FAIL if failed else Verdict.WITHIN_TOLERANCE
    top1: bool | None = None
    top5: float | None = None
    if classes:
        a, b = submitted.ravel(), reference.ravel()
        top1 = int(np.argmax(a)) == int(np.argmax(b))
        k = min(5, b.size)
        top5 = len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return ItemComparison(verdict, max_abs, rel, cos, top1, top5)


def worst(verdicts: list[Verdict]) -> Verdict:
    return max(verdicts, key=SEVERITY.__getitem__, default=Verdict.PASS)
