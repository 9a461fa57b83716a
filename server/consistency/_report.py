"""Rows of a consistency report and their Prometheus samples.

Every check run produces `Outcome` rows labelled (model, version, layer, check); per-layer checks
add one summary row with an empty layer (worst difference over layers, the context in words).
Yes/no checks (weights, training_mode, flags) report difference 0 / cosine 1 when they pass and
NaN (not measurable) when they fail.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._metrics import METRICS
from ..models import Manifest
from ..serving import ModelIdentity
from ._checks import CanaryPass, Diff, GoldenComparison
from ._golden import GoldenRecord
from ._tolerance import EXACT, Tolerance

CHECKS = (
    "weights",
    "training_mode",
    "preprocess",
    "restart",
    "coload",
    "batch",
    "cache_audit",
    "flags",
)
STRICT = EXACT
NAN = float("nan")


@dataclass(frozen=True)
class Outcome:
    """One row of a consistency report (and one set of metric samples)."""

    identity: ModelIdentity
    check: str
    layer: str
    passed: bool
    max_abs_diff: float
    min_cosine: float
    atol: float
    rtol: float
    detail: str
    checked_at: float


@dataclass(frozen=True)
class Report:
    passed: bool
    results: list[Outcome]


def flag(ok: bool) -> Diff:
    """A yes/no check's numbers."""
    return Diff(0.0, 1.0, True) if ok else Diff(NAN, NAN, False)


def row(
    ident: ModelIdentity,
    check: str,
    layer: str,
    diff: Diff,
    tol: Tolerance,
    detail: str,
    now: float,
) -> Outcome:
    text = "; ".join(x for x in (diff.detail, detail) if x)
    return Outcome(
        ident,
        check,
        layer,
        diff.passed,
        diff.max_abs,
        diff.min_cosine,
        0.0 if tol.exact else tol.atol,
        0.0 if tol.exact else tol.rtol,
        text,
        now,
    )


def layer_rows(
    ident: ModelIdentity,
    check: str,
    diffs: dict[str, Diff],
    tol: Tolerance,
    now: float,
    fail_all: bool = False,
) -> list[Outcome]:
    return [
        row(
            ident,
            check,
            layer,
            Diff(d.max_abs, d.min_cosine, False, d.detail) if fail_all else d,
            tol,
            "",
            now,
        )
        for layer, d in diffs.items()
    ]


def summary(
    ident: ModelIdentity,
    check: str,
    rows: Sequence[Outcome],
    tol: Tolerance,
    context: str,
    now: float,
    problem: str = "",
) -> Outcome:
    """The model-level row of a per-layer check: worst values, failing layers, context."""
    failing = [o.layer for o in rows if not o.passed]
    values = [o.max_abs_diff for o in rows]
    cosines = [o.min_cosine for o in rows]
    max_abs = NAN if any(math.isnan(v) for v in values) else max(values, default=0.0)
    min_cos = NAN if any(math.isnan(v) for v in cosines) else min(cosines, default=1.0)
    detail = "; ".join(x for x in (problem, context) if x)
    if failing:
        detail += f"; {len(failing)} of {len(rows)} layers beyond {tol.describe()}: {failing[:6]}"
    return row(
        ident, check, "", Diff(max_abs, min_cos, not failing and not problem), tol, detail, now
    )


def publish(rows: Iterable[Outcome]) -> None:
    for o in rows:
        ident = o.identity
        labels = (ident.name, ident.version, o.layer, o.check)
        METRICS.check_passed.labels(*labels).set(1.0 if o.passed else 0.0)
        METRICS.check_max_abs_diff.labels(*labels).set(o.max_abs_diff)
        METRICS.check_min_cosine.labels(*labels).set(o.min_cosine)
        METRICS.check_timestamp.labels(*labels).set(o.checked_at)
        if not o.passed and (o.layer == "" or o.check == "cache_audit"):
            METRICS.check_failures.labels(ident.name, ident.version, o.check).inc()


def publish_duration(ident: ModelIdentity, check: str, seconds: float) -> None:
    METRICS.check_duration.labels(ident.name, ident.version, check).set(seconds)


def forget(ident: ModelIdentity, keys: Iterable[tuple[str, str]]) -> None:
    """Removes an unloaded model's series, so that dashboards show no stale verdicts."""
    for check, layer in keys:
        labels = (ident.name, ident.version, layer, check)
        for gauge in (
            METRICS.check_passed,
            METRICS.check_max_abs_diff,
            METRICS.check_min_cosine,
            METRICS.check_timestamp,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
    for check in CHECKS:
        with contextlib.suppress(KeyError):
            METRICS.check_duration.remove(ident.name, ident.version, check)


def ordered(rows: Iterable[Outcome], manifest: Manifest) -> list[Outcome]:
    """Check order as in CHECKS; per check the summary first, then layers in catalogue order."""
    order = {c: i for i, c in enumerate(CHECKS)}
    layers = {layer.name: i for i, layer in enumerate(manifest.layers)}
    return sorted(
        rows, key=lambda o: (order.get(o.check, 99), o.layer != "", layers.get(o.layer, -1))
    )


# --- words for the rows' details ------------------------------------------------------------


def restart_context(
    golden: GoldenRecord | None,
    comparison: GoldenComparison,
    changes: list[str],
    run: CanaryPass,
    recorded_now: bool,
) -> str:
    """What the restart row compared, in words."""
    if recorded_now:
        return (
            "golden record made now (first load of this version); canary re-embedded "
            f"({run.embeddings.ids[0]}) and compared exactly"
        )
    if golden is None:
        return ""
    recorded = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(golden.recorded_at))
    context = (
        f"{len(comparison.compared)} canaries vs the golden record of {recorded} UTC; "
        + env_words(changes)
    )
    if comparison.skipped:
        context += f"; inputs changed, not compared: {comparison.skipped}"
    return context


def others_words(refs: list[str]) -> str:
    if not refs:
        return "no other model loaded"
    shown = ", ".join(refs[:5]) + (", ..." if len(refs) > 5 else "")
    return f"{len(refs)} other model(s) loaded ({shown})"


def env_words(changes: list[str]) -> str:
    if not changes:
        return "environment as recorded"
    return "environment changed: " + ", ".join(changes)
