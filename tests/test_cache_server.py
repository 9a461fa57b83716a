"""The cache through a real server: hits skip decode and inference, byte-identical; cache modes;
restart; a new model version never reads the old one's entries; stats and purge (RPC and CLI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_settings, run_cli

from embedwarden.client import Client, FailedPrecondition, InvalidArgument, NotFound
from embedwarden.server import build_registry
from embedwarden.server._metrics import METRICS
from embedwarden.server.testing import ServerThread

MODEL = "efficientnet_lite0"
LAYERS = ["features", "logits"]


def registry_with_v2():
    """The built-in model, and a version 2 whose manifest differs (no centre crop)."""
    registry = build_registry()
    text = registry.resolve(MODEL, "1").text
    changed = (
        text.replace('version = "1"', 'version = "2"')
        .replace("default = true", "default = false")
        .replace("crop_fraction = 0.875", "crop_fraction = 1.0")
    )
    assert changed.count('version = "2"') == 1 and "crop_fraction = 1.0" in changed
    registry.register_text(changed, "test:v2")
    return registry


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache-server")


@pytest.fixture(scope="module")
def cached_server(data_dir: Path) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(data_dir, cache_audit_fraction=0.0), registry_with_v2())
    thread.start()
    yield thread
    if not getattr(thread, "stopped", False):  # the restart test stops it itself
        thread.stop()


@pytest.fixture()
def cclient(cached_server: ServerThread) -> Iterator[Client]:
    with Client(cached_server.address, timeout=120) as c:
        yield c


def sample(name: str, **labels: str) -> float:
    return METRICS.sample(name, labels) or 0.0


def batches_run() -> float:
    return sample("embedwarden_batch_size_count", model=MODEL, version="1")


def test_the_same_request_twice_is_all_hits_byte_identical_without_the_model(
    cclient, cached_server, photos
):
    images = [photos[n] for n in ("chelsea", "coffee", "rocket", "astronaut")]
    first = cclient.extract(images, MODEL, layers=LAYERS, pooling="none")
    assert not any(first.cached[layer].any() for layer in LAYERS)
    assert first.timings["inference"] > 0
    cached_server.app.cache.flush(30)

    hits = sample("embedwarden_cache_lookups_total", result="hit")
    served = sample("embedwarden_extracted_items_total", model=MODEL, version="1", source="cache")
    batches = batches_run()
    second = cclient.extract(images, MODEL, layers=LAYERS, pooling="none")
    for layer in LAYERS:
        assert second.cached[layer].all()
        assert second[layer].tobytes() == first[layer].tobytes()
        assert second[layer].dtype == first[layer].dtype
    assert second.layouts == first.layouts == {"features": "CHW", "logits": "C"}
    # No decode, no inference: timings and counters show it.
    assert second.timings["preprocess"] == second.timings["inference"] == 0
    assert second.timings["queue"] == 0 and second.timings["cache"] > 0
    assert batches_run() == batches
    assert sample("embedwarden_cache_lookups_total", result="hit") == hits + 8
    assert (
        sample("embedwarden_extracted_items_total", model=MODEL, version="1", source="cache")
        == served + 4
    )


def test_each_layer_pooling_and_dtype_has_its_own_entry(cclient, cached_server, photos):
    image = [photos["coffee"]]
    avg = cclient.extract(image, MODEL, layers="features", pooling="avg", dtype="float16")
    assert not avg.cached["features"].any()  # differs from the pooling="none" float32 entry
    cached_server.app.cache.flush(30)
    again = cclient.extract(image, MODEL, layers="features", pooling="avg", dtype="float16")
    assert again.cached["features"].all() and again.array.dtype == np.float16
    assert again.array.tobytes() == avg.array.tobytes()
    normalized = cclient.extract(image, MODEL, layers="features", pooling="avg", normalize=True)
    assert not normalized.cached["features"].any()


def test_cache_off_neither_reads_nor_writes_and_refresh_overwrites(
    cclient, cached_server, photo_arrays
):
    cache = cached_server.app.cache
    image = [photo_arrays["rocket"][::2, ::2].copy()]  # a raw array input nobody sent yet
    cache.flush(30)  # earlier tests' writes are committed before the counters are read
    lookups = sum(
        sample("embedwarden_cache_lookups_total", result=r) for r in ("hit", "miss", "corrupt")
    )
    writes = sample("embedwarden_cache_writes_total")
    off = cclient.extract(image, MODEL, cache="off")
    cache.flush(30)
    assert not off.cached["features"].any()
    assert sample("embedwarden_cache_writes_total") == writes
    assert lookups == sum(
        sample("embedwarden_cache_lookups_total", result=r) for r in ("hit", "miss", "corrupt")
    )
    # Plant a wrong vector under this input's key: cache="on" trusts a valid entry ...
    extraction = cached_server.app.extraction
    from embedwarden.server.models._preprocess import RawImage
    from embedwarden.server.serving._extraction import input_digest

    raw = image[0]
    digest = input_digest(RawImage(raw.tobytes(), raw.shape, "uint8"))
    fingerprint = off.model.fingerprint
    key = cache.keys(fingerprint, "features", "avg", "float32", False, [digest])[0]
    wrong = np.full(1280, 7.0, np.float32)
    cache.store(fingerprint, [(key, wrong)])
    cache.flush(30)
    planted = cclient.extract(image, MODEL)
    assert planted.cached["features"].all() and (planted.array == 7.0).all()
    assert extraction is cached_server.app.extraction
    # ... "refresh" recomputes every item and overwrites its entry.
    refreshed = cclient.extract(image, MODEL, cache="refresh")
    assert not refreshed.cached["features"].any()
    assert refreshed.array.tobytes() == off.array.tobytes()
    cache.flush(30)
    fixed = cclient.extract(image, MODEL)
    assert fixed.cached["features"].all() and fixed.array.tobytes() == off.array.tobytes()


def test_a_corrupt_entry_is_recomputed_and_rewritten_never_served(
    cclient, cached_server, data_dir, photo_arrays
):
    image = [photo_arrays["astronaut"][::3, ::3].copy()]
    first = cclient.extract(image, MODEL, layers="logits")
    cached_server.app.cache.flush(30)
    payload = first.array[0].tobytes()
    # Bit rot under the running server: one byte of the stored payload flips on disk.
    with (data_dir / "cache" / "data.mdb").open("r+b") as f:
        where = f.read().find(payload)
        assert where > 0
        f.seek(where + 2000)
        byte = f.read(1)
        f.seek(where + 2000)
        f.write(bytes([byte[0] ^ 0x10]))
    corrupt = sample("embedwarden_cache_lookups_total", result="corrupt")
    again = cclient.extract(image, MODEL, layers="logits")
    assert not again.cached["logits"].any()  # a miss: recomputed, not the damaged bytes
    assert again.array.tobytes() == payload
    assert sample("embedwarden_cache_lookups_total", result="corrupt") == corrupt + 1
    cached_server.app.cache.flush(30)
    healed = cclient.extract(image, MODEL, layers="logits")  # the entry was rewritten
    assert healed.cached["logits"].all() and healed.array.tobytes() == payload
    assert cached_server.app.cache.db.verify().passed


def test_a_new_model_version_never_reads_the_old_versions_entries(cclient, cached_server, photos):
    image = [photos["astronaut"]]
    v1 = cclient.extract(image, f"{MODEL}@1")
    cached_server.app.cache.flush(30)
    assert cclient.extract(image, f"{MODEL}@1").cached["features"].all()
    cclient.load_model(MODEL, "2")
    try:
        v2 = cclient.extract(image, f"{MODEL}@2")
        assert v2.model.fingerprint != v1.model.fingerprint
        assert not v2.cached["features"].any()  # same input, other version: a miss
        assert not np.array_equal(v2.array, v1.array)
        cached_server.app.cache.flush(30)
        assert cclient.extract(image, f"{MODEL}@2").cached["features"].all()

        stats = cclient.cache_stats()
        by_model = {m.model: m for m in stats.models}
        assert by_model[f"{MODEL}@2"].fingerprint == v2.model.fingerprint
        assert by_model[f"{MODEL}@2"].entries == 1
        v1_entries = by_model[f"{MODEL}@1"].entries
        assert stats.entries == v1_entries + 1 and stats.enabled

        # Purge one version: the other's entries stay.
        assert cclient.purge_cache(f"{MODEL}@1") == v1_entries
        assert not cclient.extract(image, f"{MODEL}@1").cached["features"].any()
        assert cclient.extract(image, f"{MODEL}@2").cached["features"].all()
    finally:
        cclient.unload_model(MODEL, "2")


def test_purge_needs_a_version_and_a_known_model(cclient):
    with pytest.raises(ValueError, match="NAME@VERSION"):
        cclient.purge_cache(MODEL)
    with pytest.raises(NotFound):
        cclient.purge_cache("nope@1")
    from embedwarden.v1 import admin_pb2, types_pb2

    request = admin_pb2.PurgeCacheRequest(model=types_pb2.ModelRef(name=MODEL))
    with pytest.raises(InvalidArgument, match="one version at a time"):
        cclient._call(cclient._admin.PurgeCache, request)


def test_cli_stats_purge_and_offline_verify(cclient, cached_server, data_dir, photos):
    cclient.extract([photos["chelsea"]], MODEL)
    cached_server.app.cache.flush(30)
    address = cached_server.address
    stats = json.loads(run_cli("--server", address, "cache", "stats", "--json").stdout)
    assert stats["enabled"] is True and int(stats["entries"]) >= 1
    assert stats["path"] == str(data_dir / "cache")
    assert any(m["model"] == f"{MODEL}@1" for m in stats["models"])
    text = run_cli("--server", address, "cache", "stats").stdout
    assert "entries" in text and f"{MODEL}@1" in text and "hits" in text

    # verify runs in its own process beside the live server (LMDB readers don't block).
    verified = run_cli("cache", "verify", "--data-dir", str(data_dir), "--json")
    report = json.loads(verified.stdout)
    assert report["passed"] and report["entries"] == report["ok"] >= 1

    out = run_cli("--server", address, "cache", "purge", "--model", f"{MODEL}@1").stdout
    assert out.startswith("removed ") and f"of {MODEL}@1" in out
    assert not cclient.extract([photos["chelsea"]], MODEL).cached["features"].any()
    out = run_cli("--server", address, "cache", "purge").stdout
    assert "(all versions)" in out
    assert cclient.cache_stats().entries == 0
    bad = run_cli("--server", address, "cache", "purge", "--model", MODEL, check=False)
    assert bad.returncode == 2 and "NAME@VERSION" in bad.stderr


def test_restart_still_hits_byte_identical(cached_server, data_dir, photos):
    images = [photos["coffee"], photos["rocket"]]
    with Client(cached_server.address) as c:
        before = c.extract(images, MODEL, layers=LAYERS)
    cached_server.stop()  # graceful: commits what is queued
    cached_server.stopped = True  # type: ignore[attr-defined]
    restarted = ServerThread(make_settings(data_dir, cache_audit_fraction=0.0))
    restarted.start()
    try:
        with Client(restarted.address) as c:
            after = c.extract(images, MODEL, layers=LAYERS)
        for layer in LAYERS:
            assert after.cached[layer].all()
            assert after[layer].tobytes() == before[layer].tobytes()
    finally:
        restarted.stop()


def test_a_server_without_cache_says_so(tmp_path):
    with ServerThread(make_settings(tmp_path, cache_enabled=False, models=())) as thread:
        with Client(thread.address) as c:
            assert c.cache_stats().enabled is False
            with pytest.raises(FailedPrecondition, match="without a cache"):
                c.purge_cache()
        assert not (tmp_path / "cache").exists()
