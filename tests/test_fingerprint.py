"""Fingerprint pinning through real servers: `ModelRef.fingerprint` on requests,
`--require-fingerprint` at load, read-only shipped golden records (`--golden-dir`)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from helpers import ServerProcess, make_settings

from embedwarden.client import Client, FailedPrecondition, InvalidArgument
from embedwarden.server import FingerprintMismatch, InvalidInput, NotFound, build_registry
from embedwarden.server._metrics import METRICS
from embedwarden.server.testing import ServerThread

MODEL = "efficientnet_lite0"
DEFAULT = build_registry().resolve(MODEL)
FINGERPRINT = DEFAULT.fingerprint()
OTHER = "0123456789abcdef" * 4  # well formed, no registered version has it


def write_manifest(folder: Path, name: str, *replacements: tuple[str, str]) -> Path:
    """A copy of the default manifest under another name, optionally changed."""
    text = DEFAULT.text.replace(f'name = "{MODEL}"', f'name = "{name}"')
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}@1.toml"
    path.write_text(text)
    return path


def fingerprint_of(folder: Path, ref: str) -> str:
    return build_registry([folder]).resolve_ref(ref).fingerprint()


# --- the one check, without gRPC ---------------------------------------------------------------


def test_registry_resolve_checks_a_pinned_fingerprint():
    registry = build_registry()
    assert registry.resolve(MODEL, "1", FINGERPRINT) == DEFAULT
    assert registry.resolve(MODEL, "", FINGERPRINT.upper()) == DEFAULT  # any case
    with pytest.raises(FingerprintMismatch) as caught:
        registry.resolve(MODEL, "1", OTHER)
    assert FINGERPRINT in str(caught.value) and OTHER in str(caught.value)


# --- per request: ModelRef.fingerprint ---------------------------------------------------------


def test_a_request_pinned_to_the_served_fingerprint_is_served(client, photos):
    result = client.extract(
        [photos["chelsea"]], MODEL, layers="features", cache="off", expect_fingerprint=FINGERPRINT
    )
    plain = client.extract([photos["chelsea"]], MODEL, layers="features", cache="off")
    assert result.model.fingerprint == FINGERPRINT
    np.testing.assert_array_equal(result["features"], plain["features"])


def test_a_request_pinned_to_another_fingerprint_fails_and_the_server_keeps_serving(client, photos):
    with pytest.raises(FailedPrecondition) as caught:
        client.extract([photos["chelsea"]], MODEL, expect_fingerprint=OTHER)
    assert FINGERPRINT in caught.value.details and OTHER in caught.value.details
    # Every RPC that names a model goes through the same check.
    for call in (
        lambda: list(client.extract_stream([photos["coffee"]], MODEL, expect_fingerprint=OTHER)),
        lambda: client.describe_model(MODEL, expect_fingerprint=OTHER),
        lambda: client.load_model(MODEL, expect_fingerprint=OTHER),
        lambda: client.unload_model(MODEL, "1", expect_fingerprint=OTHER),
        lambda: client.create_collection("pinned", MODEL, expect_fingerprint=OTHER),
    ):
        with pytest.raises(FailedPrecondition, match=OTHER):
            call()
    assert client.health() == "SERVING" and client.health(f"model:{MODEL}@1") == "SERVING"
    assert client.extract([photos["chelsea"]], MODEL).model.fingerprint == FINGERPRINT


def test_a_malformed_pin_is_an_invalid_argument(client, photos):
    with pytest.raises(InvalidArgument, match="64 hex digits"):
        client.extract([photos["chelsea"]], MODEL, expect_fingerprint=FINGERPRINT[:16])


# --- at load: --require-fingerprint -----------------------------------------------------------


def test_require_fingerprint_mismatch_keeps_the_model_not_serving(tmp_path, photos):
    models = tmp_path / "models"
    write_manifest(models, "lite_pinned")
    settings = make_settings(
        tmp_path / "data",
        models=("lite_pinned",),
        models_dirs=(models,),
        require_fingerprints=(f"lite_pinned@1={OTHER}",),
    )
    with ServerThread(settings) as thread:
        with Client(thread.address) as client:
            assert client.health("model:lite_pinned@1") == "NOT_SERVING"
            assert client.health() == "NOT_SERVING"
            state = next(m for m in client.list_models() if m.identity.name == "lite_pinned")
            actual = fingerprint_of(models, "lite_pinned@1")
            assert actual in state.state_detail and OTHER in state.state_detail
            with pytest.raises(FailedPrecondition, match=OTHER):
                client.extract([photos["chelsea"]], "lite_pinned")
        labels = {"model": "lite_pinned", "version": "1"}
        assert METRICS.sample("embedwarden_model_serving", labels) == 0


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (f"{MODEL}@1", InvalidInput, "expected NAME@VERSION=HEX"),
        (f"{MODEL}={OTHER}", InvalidInput, "expected NAME@VERSION=HEX"),
        (f"{MODEL}@1=abc", InvalidInput, "64 hex digits"),
        (f"nonexistent@1={OTHER}", NotFound, "unknown model 'nonexistent'"),
        (f"{MODEL}@1={OTHER},{MODEL}@1={FINGERPRINT}", InvalidInput, "two fingerprints"),
    ],
)
def test_require_fingerprint_values_are_checked_before_anything_loads(
    tmp_path, spec, error, message
):
    pins = tuple(spec.split(","))
    with pytest.raises(error, match=message):
        ServerThread(make_settings(tmp_path, models=(), require_fingerprints=pins))


# --- two replicas on loopback, one with another manifest under the same name@version ----------


def test_a_pinned_client_is_refused_by_the_replica_with_another_manifest(tmp_path, photos):
    good, bad = tmp_path / "models-a", tmp_path / "models-b"
    write_manifest(good, "lite_replica")
    write_manifest(bad, "lite_replica", ('interpolation = "bicubic"', 'interpolation = "bilinear"'))
    expected = fingerprint_of(good, "lite_replica@1")
    other = fingerprint_of(bad, "lite_replica@1")
    assert expected != other
    pin = f"lite_replica@1={expected}"
    a = ServerProcess(
        tmp_path / "a", "--models", "lite_replica", "--models-dir", str(good),
        "--require-fingerprint", pin,
    )  # fmt: skip
    b = ServerProcess(tmp_path / "b", "--models", "lite_replica", "--models-dir", str(bad))
    try:
        a.start()
        b.start()
        with Client(a.address) as ca, Client(b.address) as cb:
            served = ca.extract([photos["chelsea"]], "lite_replica", expect_fingerprint=expected)
            assert served.model.fingerprint == expected
            with pytest.raises(FailedPrecondition) as caught:
                cb.extract([photos["chelsea"]], "lite_replica", expect_fingerprint=expected)
            assert expected in caught.value.details and other in caught.value.details
            # Unpinned, B would have answered with its own definition: the pin is what refuses.
            assert cb.extract([photos["chelsea"]], "lite_replica").model.fingerprint == other
            assert cb.health("model:lite_replica@1") == "SERVING"
    finally:
        a.stop()
        b.stop()
    # B again, now started with the fleet's pin: it refuses to load at all.
    b_pinned = ServerProcess(
        tmp_path / "b", "--models", "lite_replica", "--models-dir", str(bad),
        "--require-fingerprint", pin, name="b-pinned",
    )  # fmt: skip
    try:
        b_pinned.start(service="live")  # alive, its startup load attempted
        with Client(b_pinned.address) as cb:
            assert cb.health("model:lite_replica@1") == "NOT_SERVING"
            assert cb.health() == "NOT_SERVING"
    finally:
        b_pinned.stop()
    log = b_pinned.log.read_text()
    assert f"has fingerprint {other}" in log and expected in log


# --- shipped, read-only golden records --------------------------------------------------------


def test_shipped_golden_records_are_checked_against_and_never_written(tmp_path, server):
    shipped = tmp_path / "golden"
    shutil.copytree(server.app.settings.golden_dir, shipped)
    for path in [shipped, *shipped.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    data = tmp_path / "data"
    with ServerThread(make_settings(data, models=(MODEL,), shipped_golden_dir=shipped)) as thread:
        with Client(thread.address) as client:
            assert client.health(f"model:{MODEL}@1") == "SERVING"
        restart = {(o.check, o.layer): o for o in thread.app.monitor.results(MODEL, "1")}
        assert restart[("restart", "")].passed
        assert not (data / "golden").exists()
        for path in [shipped, *shipped.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_a_version_missing_from_the_shipped_golden_dir_is_not_served(tmp_path):
    empty = tmp_path / "golden"
    empty.mkdir()
    models = tmp_path / "models"
    write_manifest(models, "lite_unshipped")
    data = tmp_path / "data"
    settings = make_settings(
        data, models=("lite_unshipped",), models_dirs=(models,), shipped_golden_dir=empty
    )
    with ServerThread(settings) as thread:
        with Client(thread.address) as client:
            assert client.health("model:lite_unshipped@1") == "NOT_SERVING"
            state = next(m for m in client.list_models() if m.identity.name == "lite_unshipped")
        assert "--golden-dir" in state.state_detail
        assert not list(empty.iterdir()) and not (data / "golden").exists()
