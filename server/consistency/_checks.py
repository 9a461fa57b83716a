"""The numerical side of the consistency checks: running canaries, comparing with tolerances.

Nothing here keeps state or touches metrics; `_monitor` schedules these and reports them.

Canaries run one at a time (batch of one) straight through the backbone, on the caller's
thread, never through the dynamic batcher: a canary mixed into live traffic would be computed
in a batch of unknown composition, and batch composition alone moves outputs by a few ulp
(see the batch check), which would make an exact comparison meaningless. One canary is one
short forward pass, so a check never holds the CPU for long.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..models import LayerSpec, Manifest, tensor_sha256
from ..serving import LoadedModel
from ._canaries import Canary, filler, text_filler
from ._golden import CanaryEmbeddings, full_plan
from ._tolerance import EXACT, Tolerance

MAX_CANARY_PIXELS = 1 << 31  # canaries are small; request limits don't apply to them
BATCH_OUTPUT_BUDGET = 256 << 20  # bytes of layer outputs one batch check may hold


@dataclass(frozen=True)
class Diff:
    max_abs: float
    min_cosine: float
    passed: bool
    detail: str = ""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of [N, ...] arrays, in float64: exactly 1 for identical rows
    (two zero rows included), 0 where only one row is zero."""
    a2 = a.reshape(len(a), -1).astype(np.float64)
    b2 = b.reshape(len(b), -1).astype(np.float64)
    dot = np.einsum("ij,ij->i", a2, b2)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    identical = (a2 == b2).all(axis=1)
    return np.where(identical, 1.0, np.clip(cos, -1.0, 1.0))


def compare(pairs: Sequence[tuple[np.ndarray, np.ndarray]], tol: Tolerance) -> Diff:
    """Compares (actual, expected) array pairs; each pair is [rows, ...], one row per canary.

    max_abs is over every element, min_cosine over every row. Exact means bit-identical."""
    max_abs = 0.0
    min_cos = 1.0
    passed = True
    for actual, expected in pairs:
        if actual.shape != expected.shape:
            return Diff(float("inf"), 0.0, False, f"shape {actual.shape} != {expected.shape}")
        if actual.size == 0:
            continue
        a = actual.astype(np.float64)
        b = expected.astype(np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            same = np.array_equal(a, b, equal_nan=True)
            return Diff(0.0 if same else float("inf"), 1.0 if same else 0.0, same, "non-finite")
        delta = np.abs(a - b)
        max_abs = max(max_abs, float(delta.max()))
        min_cos = min(min_cos, float(cosines(a, b).min()))
        if tol.exact:
            passed = passed and actual.tobytes() == expected.tobytes()
        else:
            passed = passed and bool((delta <= tol.atol + tol.rtol * np.abs(b)).all())
    if not tol.exact:
        passed = passed and min_cos >= tol.min_cosine
    return Diff(max_abs, min_cos, passed)


def channel_axis(layer: LayerSpec) -> int | None:
    return layer.layout.index("C") if len(layer.shape) > 1 and "C" in layer.layout else None


def summaries(output: np.ndarray, layer: LayerSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(mean, max) over every axis but the channel axis; a vector layer is its own summary."""
    axis = channel_axis(layer)
    if axis is None:
        return output.astype(np.float32, copy=False), None
    others = tuple(i for i in range(output.ndim) if i != axis)
    return output.mean(axis=others, dtype=np.float32), output.max(axis=others)


def output_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


@dataclass
class CanaryPass:
    embeddings: CanaryEmbeddings
    kept: dict[str, list[np.ndarray]]  # full outputs of `keep` layers, per canary
    seconds: float


def run_canaries(
    model: LoadedModel,
    canaries: Sequence[Canary],
    keep: Sequence[str] = (),
    only: Sequence[int] | None = None,
) -> CanaryPass:
    """Preprocesses and embeds canaries one by one through every catalogued layer."""
    started = time.perf_counter()
    manifest = model.manifest
    layers = [layer.name for layer in manifest.layers]
    plan = full_plan(manifest)
    chosen = list(range(len(canaries))) if only is None else list(only)
    tensors = []
    avg: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    mx: dict[str, list[np.ndarray]] = {}
    full: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    hashes: dict[str, list[str]] = {name: [] for name in layers}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in keep}
    for position, index in enumerate(chosen):
        tensor = model.preprocessor.prepare(canaries[index].source, MAX_CANARY_PIXELS)
        tensors.append(tensor)
        outputs = model.backbone.infer(tensor[None], layers)
        for spec in manifest.layers:
            out = outputs[spec.name][0]
            mean, peak = summaries(out, spec)
            avg[spec.name].append(mean)
            if peak is not None:
                mx.setdefault(spec.name, []).append(peak)
            hashes[spec.name].append(output_sha256(out))
            if position < plan[spec.name]:
                full[spec.name].append(np.array(out, dtype=np.float32))
            if spec.name in kept:
                kept[spec.name].append(out)
    embeddings = CanaryEmbeddings(
        ids=[canaries[i].id for i in chosen],
        source_sha256=[canaries[i].source_sha256 for i in chosen],
        tensor_sha256=[tensor_sha256(t) for t in tensors],
        tensors=np.stack(tensors),
        avg={k: np.stack(v) for k, v in avg.items()},
        max={k: np.stack(v) for k, v in mx.items()},
        full={k: np.stack(v) for k, v in full.items() if v},
        output_sha256=hashes,
    )
    return CanaryPass(embeddings, kept, time.perf_counter() - started)


@dataclass
class GoldenComparison:
    preprocess: Diff
    layers: dict[str, Diff]
    compared: list[str]  # canary ids compared
    skipped: list[str]  # canaries whose input changed since the record (not comparable)


def compare_golden(
    run: CanaryEmbeddings, golden: CanaryEmbeddings, manifest: Manifest, tol: Tolerance
) -> GoldenComparison:
    """Compares a fresh pass with the golden one, canary by canary and layer by layer."""
    recorded = {cid: i for i, cid in enumerate(golden.ids)}
    pairs = [
        (i, recorded[cid])
        for i, cid in enumerate(run.ids)
        if cid in recorded and golden.source_sha256[recorded[cid]] == run.source_sha256[i]
    ]
    compared = [run.ids[i] for i, _ in pairs]
    skipped = [cid for cid in run.ids if cid not in compared]
    if not pairs:
        nothing = Diff(float("nan"), float("nan"), False, "no canary in common with the record")
        return GoldenComparison(nothing, {s.name: nothing for s in manifest.layers}, [], skipped)
    ri = [i for i, _ in pairs]
    gi = [j for _, j in pairs]

    # Preprocessing is integer and table arithmetic: exact in every environment.
    pre = compare([(run.tensors[ri], golden.tensors[gi])], EXACT)
    changed = [run.ids[i] for i, j in pairs if run.tensor_sha256[i] != golden.tensor_sha256[j]]
    pre = Diff(
        pre.max_abs,
        pre.min_cosine,
        not changed and pre.passed,
        f"tensor hash differs for {', '.join(changed)}" if changed else "",
    )

    layers: dict[str, Diff] = {}
    for spec in manifest.layers:
        name = spec.name
        if name not in golden.avg:
            layers[name] = Diff(float("nan"), float("nan"), False, "layer not in the record")
            continue
        arrays = [(run.avg[name][ri], golden.avg[name][gi])]
        if name in run.max and name in golden.max:
            arrays.append((run.max[name][ri], golden.max[name][gi]))
        full_rows = [
            (i, j)
            for i, j in pairs
            if name in run.full
            and name in golden.full
            and i < len(run.full[name])
            and j < len(golden.full[name])
        ]
        if full_rows:
            arrays.append(
                (
                    run.full[name][[i for i, _ in full_rows]],
                    golden.full[name][[j for _, j in full_rows]],
                )
            )
        diff = compare(arrays, tol)
        if tol.exact:
            hashes_equal = all(
                run.output_sha256[name][i] == golden.output_sha256[name][j] for i, j in pairs
            )
            if not hashes_equal and diff.passed:
                diff = Diff(diff.max_abs, diff.min_cosine, False, "full output hash differs")
        layers[name] = diff
    return GoldenComparison(pre, layers, compared, skipped)


def batch_layers(manifest: Manifest, batch_size: int) -> list[str]:
    """Layers the batch check compares in full: all that fit the output budget, the default
    layer first, then from the last layer backwards (a batch effect anywhere reaches them)."""
    order = [manifest.layer(manifest.default_layer)] + [
        layer for layer in reversed(manifest.layers) if layer.name != manifest.default_layer
    ]
    chosen: list[str] = []
    left = BATCH_OUTPUT_BUDGET
    for layer in order:
        size = 4 * int(np.prod(layer.shape)) * batch_size
        if size <= left:
            chosen.append(layer.name)
            left -= size
    return [layer.name for layer in manifest.layers if layer.name in chosen]


def batch_positions(count: int, batch_size: int) -> list[int]:
    """Where the canaries sit in the full batch: spread from the first row to the last."""
    count = min(count, batch_size)
    if count <= 1:
        return list(range(count))
    return [round(k * (batch_size - 1) / (count - 1)) for k in range(count)]


def batch_check(
    model: LoadedModel,
    canaries: Sequence[Canary],
    alone: dict[str, list[np.ndarray]],
    batch_size: int,
    tol: Tolerance,
) -> tuple[dict[str, Diff], int]:
    """Each canary inside one full batch of other images vs the same canary alone.

    Returns per-layer diffs (tolerance, never exact: batch composition legitimately moves
    results by rounding) and the number of canaries placed in the batch."""
    count = min(len(canaries), batch_size)
    positions = batch_positions(count, batch_size)
    size = model.manifest.preprocess.size
    text = model.manifest.modality == "text"
    rows: list[np.ndarray] = []
    canary_at = dict(zip(positions, range(count), strict=True))
    for row in range(batch_size):
        if row in canary_at:
            source = canaries[canary_at[row]].source
        else:
            source = text_filler(row) if text else filler(row, size)
        rows.append(model.preprocessor.prepare(source, MAX_CANARY_PIXELS))
    layers = list(alone)
    outputs = model.backbone.infer(np.stack(rows), layers)
    diffs = {}
    for name in layers:
        batched = np.stack([outputs[name][p] for p in positions])
        single = np.stack(alone[name][:count])
        diffs[name] = compare([(batched, single)], tol)
    return diffs, count
