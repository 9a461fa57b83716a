"""Consistency monitor, without a server: canaries, comparisons and tolerances, golden records,
environment and manifest differences, the background worker."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from embedwarden.server import ConsistencyFailure, build_registry
from embedwarden.server.consistency import EXACT, Tolerance
from embedwarden.server.consistency._canaries import canaries, filler
from embedwarden.server.consistency._checks import (
    batch_layers,
    batch_positions,
    compare,
    summaries,
)
from embedwarden.server.consistency._golden import (
    ARRAYS,
    FULL_TENSOR_BUDGET,
    CanaryEmbeddings,
    GoldenRecord,
    GoldenStore,
    env_changes,
    environment,
    full_plan,
    manifest_changes,
)
from embedwarden.server.consistency._worker import Worker
from embedwarden.server.serving._manager import ModelIdentity

DEFAULT = build_registry().resolve("efficientnet_lite0")
# The synthetic canaries are integer-only and must never change: a change would silently make
# every golden record incomparable. (Photos are scikit-image's files; their hashes are recorded
# per golden record, so an upgrade that changes them is reported as such.)
SYNTHETIC_SHA256 = {
    "synthetic/zoneplate": "17c67a3c6fb4d150",
    "synthetic/blocks": "8c51f3ee5278b73c",
    "synthetic/portrait": "a7c7c4499fb3525d",
    "synthetic/tiny": "e210c79e29e62efe",
}
DEFAULT_TOL = Tolerance.of(DEFAULT, exact=False)


def test_synthetic_canaries_are_pinned_and_photos_are_real_files():
    cs = canaries()
    assert [c.id for c in cs][:2] == ["photo/chelsea", "synthetic/zoneplate"]  # kept in full
    got = {c.id: c.source_sha256[:16] for c in cs if c.kind == "synthetic"}
    assert got == SYNTHETIC_SHA256
    photos = [c for c in cs if c.kind == "photo"]
    assert {c.id for c in photos} == {"photo/chelsea", "photo/rocket", "photo/coffee"}
    assert all(isinstance(c.source, bytes) for c in photos)
    assert next(c for c in photos if c.id == "photo/rocket").source[:3] == b"\xff\xd8\xff"  # JPEG
    canaries.cache_clear()
    assert [c.source_sha256 for c in canaries()] == [c.source_sha256 for c in cs]
    assert filler(3, 224).shape != filler(4, 224).shape


def test_identical_arrays_are_exact_with_difference_0_and_cosine_1():
    a = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    diff = compare([(a, a.copy())], EXACT)
    assert diff == type(diff)(0.0, 1.0, True)
    one_ulp = np.nextafter(a, np.float32(np.inf))
    assert not compare([(one_ulp, a)], EXACT).passed


def test_default_tolerance_passes_batch_rounding_and_fails_a_batchnorm_bug():
    """The manifest defaults against the magnitudes in REFERENCE.md: rounding from batch
    composition or thread count is 1e-7..1.5e-5 on activations of order 1..10 (measured on the
    default model: 1.4e-5 on `features`, whose values reach 6); a BatchNorm in training mode
    moves outputs by 1e-1 and more."""
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 6, (8, 1280)).astype(np.float32)
    rounding = ref + rng.uniform(-1.5e-5, 1.5e-5, ref.shape).astype(np.float32)
    assert compare([(rounding, ref)], DEFAULT_TOL).passed
    assert not compare([(rounding, ref)], EXACT).passed
    bug = ref + rng.normal(0, 0.1, ref.shape).astype(np.float32)
    diff = compare([(bug, ref)], DEFAULT_TOL)
    assert not diff.passed and diff.max_abs > 0.1
    assert not compare([(ref[:, ::-1].copy(), ref)], DEFAULT_TOL).passed  # a permutation
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare([(nan, ref)], DEFAULT_TOL).passed
    assert not compare([(ref[:4], ref)], DEFAULT_TOL).passed  # shapes differ


def test_a_uniform_scale_is_caught_by_the_tolerance_not_only_by_cosine():
    ref = np.random.default_rng(2).uniform(0, 6, (4, 64)).astype(np.float32)
    diff = compare([(ref * 1.01, ref)], DEFAULT_TOL)
    assert diff.min_cosine > 0.9999999 and not diff.passed  # measured 1 - 3.3e-16 (float64)


def test_summaries_reduce_everything_but_channels():
    stem = DEFAULT.layer("stem")  # CHW
    x = np.random.default_rng(3).standard_normal(stem.shape).astype(np.float32)
    mean, peak = summaries(x, stem)
    assert mean.shape == peak.shape == (32,)
    np.testing.assert_allclose(mean, x.mean(axis=(1, 2)), rtol=1e-5)
    logits = DEFAULT.layer("logits")
    v, none = summaries(x.reshape(-1)[:1000], logits)
    assert v.shape == (1000,) and none is None


def test_full_tensors_fit_the_budget_and_batch_layers_start_from_the_default():
    plan = full_plan(DEFAULT)
    stored = sum(k * 4 * int(np.prod(DEFAULT.layer(n).shape)) for n, k in plan.items())
    assert stored <= FULL_TENSOR_BUDGET
    assert plan["stem"] >= 1 and plan["features"] >= 1 and max(plan.values()) == 2
    assert batch_layers(DEFAULT, 32) == [layer.name for layer in DEFAULT.layers]  # all fit
    few = batch_layers(DEFAULT, 512)
    assert "features" in few and "stem" not in few
    assert batch_positions(7, 32) == [0, 5, 10, 16, 21, 26, 31]
    assert batch_positions(7, 4) == [0, 1, 2, 3]


def test_environment_differences_name_the_fields():
    full = environment("cpu", DEFAULT)
    assert {"torch", "numpy", "pillow", "torch_threads", "cpu_capability", "device"} <= set(full)
    # As in a process where no Keras model was loaded (other tests may have imported it).
    env = {k: v for k, v in full.items() if not k.startswith(("tensorflow", "keras", "tf_"))}
    assert env_changes(env, dict(env), "torch") == []
    upgraded = {**env, "torch": "9.9.9", "tensorflow": "2.99"}
    assert env_changes(env, upgraded, "torch") == [f"torch {env['torch']} -> 9.9.9"]
    assert "tensorflow (absent) -> 2.99" in env_changes(env, upgraded, "keras")


def test_manifest_changes_name_what_changed_under_a_version():
    old = DEFAULT.canonical()
    new = json.loads(json.dumps(old))
    new["preprocess"]["interpolation"] = "bilinear"
    new["layers"][1]["shape"] = [16, 112, 111]
    assert manifest_changes(old, new) == [
        "layers[1].shape[2]: 112 -> 111",
        "preprocess.interpolation: 'bicubic' -> 'bilinear'",
    ]


def _record(fingerprint: str) -> GoldenRecord:
    rng = np.random.default_rng(4)
    embeddings = CanaryEmbeddings(
        ids=["photo/a", "synthetic/b"],
        source_sha256=["aa", "bb"],
        tensor_sha256=["ta", "tb"],
        tensors=rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
        avg={"stem": rng.standard_normal((2, 4)).astype(np.float32)},
        max={"stem": rng.standard_normal((2, 4)).astype(np.float32)},
        full={"stem": rng.standard_normal((1, 4, 2, 2)).astype(np.float32)},
        output_sha256={"stem": ["oa", "ob"]},
    )
    return GoldenRecord(
        name="m",
        version="1",
        fingerprint=fingerprint,
        weights_sha256="w" * 64,
        manifest={"preprocess": {"size": 8}},
        environment={"torch": "1"},
        state_checksum="c" * 64,
        recorded_at=1000.0,
        canary_set=1,
        embeddings=embeddings,
    )


def test_golden_store_round_trip_is_atomic_and_first_writer_wins(tmp_path):
    store = GoldenStore(tmp_path / "golden")
    saved = store.save(_record("a" * 64))
    assert saved.path == tmp_path / "golden" / ("m@1-" + "a" * 16)
    assert not list((tmp_path / "golden").glob(".tmp-*"))
    ident = ModelIdentity("m", "1", "a" * 64, "w" * 64)
    loaded = store.find(ident)
    assert loaded is not None and loaded.embeddings.ids == ["photo/a", "synthetic/b"]
    np.testing.assert_array_equal(loaded.embeddings.full["stem"], saved.embeddings.full["stem"])
    assert loaded.embeddings.output_sha256 == {"stem": ["oa", "ob"]}
    later = _record("a" * 64)
    later.recorded_at = 2000.0
    assert store.save(later).recorded_at == 1000.0  # never rewritten
    other = ModelIdentity("m", "1", "b" * 64, "w" * 64)
    assert store.find(other) is None
    assert [m["fingerprint"] for m in store.others(other)] == ["a" * 64]
    assert store.others(ident) == []
    assert store.others(ModelIdentity("m", "10", "a" * 64, "w" * 64)) == []


def test_a_corrupted_golden_record_is_refused_never_re_recorded(tmp_path):
    store = GoldenStore(tmp_path)
    saved = store.save(_record("a" * 64))
    assert saved.path is not None
    data = bytearray((saved.path / ARRAYS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (saved.path / ARRAYS).write_bytes(bytes(data))
    ident = ModelIdentity("m", "1", "a" * 64, "w" * 64)
    with pytest.raises(ConsistencyFailure, match="corrupted"):
        store.find(ident)
    record = saved.path / "record.json"
    record.write_text(record.read_text()[:200])  # a torn write by hand
    with pytest.raises(ConsistencyFailure, match="cannot be read"):
        store.find(ident)


def test_worker_runs_deduplicated_jobs_and_periodic_checks():
    ran: list[str] = []
    ticks = threading.Event()

    def periodic() -> None:
        ran.append("periodic")
        ticks.set()

    worker = Worker(0.05, periodic)
    gate = threading.Event()
    worker.submit("slow", gate.wait)
    for _ in range(5):
        worker.submit("same", lambda: ran.append("job"))
    gate.set()
    assert ticks.wait(5)
    deadline = time.monotonic() + 5
    while ran.count("periodic") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.close()
    assert ran.count("job") == 1 and ran.count("periodic") >= 3
    worker.submit("after", lambda: ran.append("late"))  # closed: ignored
    time.sleep(0.05)
    assert "late" not in ran
