"""Parity reports: the arithmetic, the CompareModels RPC, `embedwarden parity`, and the metrics of
configured pairs. The server compares the torch default with its Keras port (agree within
rounding), with a copy whose preprocessing differs (diverges at "preprocess") and with a copy
whose weights differ from block 5 on (diverges at "blocks.5")."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from helpers import make_settings, run_cli

from embedwarden.client import Client, FailedPrecondition, InvalidArgument, NotFound
from embedwarden.server import InvalidInput, ManifestError, build_registry
from embedwarden.server import NotFound as ServerNotFound
from embedwarden.server._metrics import METRICS
from embedwarden.server.consistency import Tolerance
from embedwarden.server.consistency._checks import cosines
from embedwarden.server.consistency._parity import (
    canary_inputs,
    channels_last,
    comparable_layers,
    compare_arrays,
    parse_pairs,
    to_channels_last,
)
from embedwarden.server.models._weights import read_verified, sha256_file
from embedwarden.server.testing import ServerThread

REGISTRY = build_registry()
TORCH = REGISTRY.resolve("efficientnet_lite0")
KERAS = REGISTRY.resolve("efficientnet_lite0_keras")
LOOSE = Tolerance(1e-4, 1e-3, 0.9999)
PAIR = ("efficientnet_lite0@1", "efficientnet_lite0_keras@1")

# --- arithmetic (no server) --------------------------------------------------------------------


def test_layouts_are_brought_channels_last():
    assert channels_last("CHW") == "HWC" and channels_last("HWC") == "HWC"
    assert channels_last("C") == "C" and channels_last("TC") == "TC"
    chw = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    hwc = to_channels_last(chw, "CHW")
    assert hwc.shape == (2, 4, 5, 3) and hwc[1, 2, 3, 0] == chw[1, 0, 2, 3]
    assert to_channels_last(hwc, "HWC") is hwc


def test_cosines_per_item():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    b = np.array([[0.0, 2.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(cosines(a, b), [0.0, 1.0, 1.0, 0.0], atol=1e-12)


def test_compare_arrays_reports_difference_cosine_and_top1():
    a = np.array([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]], np.float32)
    b = a + np.array([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]], np.float32)  # item 1 flips its argmax
    result = compare_arrays("logits", a, b, LOOSE, classes=True)
    assert result.max_abs_diff == 4.0 and result.top1_agreement == 0.5
    assert result.min_cosine < result.mean_cosine < 1.0 and result.diverged
    same = compare_arrays("features", a, a + 1e-6, LOOSE, classes=False)
    assert same.top1_agreement == -1.0 and not same.diverged
    assert same.min_cosine > 0.99999


def test_rounding_is_judged_relative_to_the_values():
    big = np.full((1, 10), 1000.0, np.float32)
    assert not compare_arrays("x", big, big + 0.5, LOOSE, classes=False).diverged
    assert compare_arrays("x", big / 1000, big / 1000 + 0.5, LOOSE, classes=False).diverged
    with pytest.raises(InvalidInput, match="shapes differ"):
        compare_arrays("x", big, big[:, :5], LOOSE, classes=False)


def test_shared_layers_across_layouts():
    pairs = comparable_layers(TORCH, KERAS)
    assert [a.name for a, _ in pairs] == [layer.name for layer in TORCH.layers]
    assert pairs[0][0].layout == "CHW" and pairs[0][1].layout == "HWC"
    assert [a.name for a, _ in comparable_layers(TORCH, KERAS, ["logits", "stem"])] == [
        "logits",
        "stem",
    ]
    with pytest.raises(ServerNotFound, match="nope"):
        comparable_layers(TORCH, KERAS, ["nope"])
    other = TORCH.text.replace('name = "efficientnet_lite0"', 'name = "x"').replace(
        "shape = [1280, 7, 7]", "shape = [1280, 8, 8]"
    )
    from embedwarden.server import parse_manifest

    changed = parse_manifest(other)
    assert "features" not in [a.name for a, _ in comparable_layers(TORCH, changed)]
    with pytest.raises(InvalidInput, match="not comparable"):
        comparable_layers(TORCH, changed, ["features"])


def test_configured_pairs_are_resolved_at_start():
    [(a, b)] = parse_pairs(["efficientnet_lite0;efficientnet_lite0_keras@1"], REGISTRY)
    assert (a.ref, b.ref) == PAIR
    with pytest.raises(ManifestError, match="MODEL_A;MODEL_B"):
        parse_pairs(["efficientnet_lite0,efficientnet_lite0_keras"], REGISTRY)
    with pytest.raises(ServerNotFound):
        parse_pairs(["efficientnet_lite0;typo"], REGISTRY)


# --- the RPC, the CLI and the metrics (a real server) ----------------------------------------


def _variant(root, name: str, text: str) -> None:
    text = text.replace('name = "efficientnet_lite0"', f'name = "{name}"')
    (root / f"{name}@1.toml").write_text(text)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    models = root / "models"
    models.mkdir()
    _variant(models, "lite0_bilinear", TORCH.text.replace('"bicubic"', '"bilinear"'))
    _variant(models, "lite0_idle", TORCH.text)
    # The same network with block 5's depthwise BatchNorm statistics changed.
    _, data = read_verified(TORCH)
    state = torch.load(io.BytesIO(data), weights_only=True)
    state["_blocks.5._bn1.running_var"] = state["_blocks.5._bn1.running_var"] * 4
    weights = root / "weights" / "lite0-perturbed.pth"
    weights.parent.mkdir()
    torch.save(state, weights)
    perturbed = (
        TORCH.text.replace(TORCH.weights.file, weights.name)
        .replace(TORCH.weights.sha256, sha256_file(weights))
        .replace(f'package = "{TORCH.weights.package}"', f'path = "{weights.parent}"')
    )
    _variant(models, "lite0_perturbed", perturbed)
    settings = make_settings(
        root / "data",
        models_dirs=(models,),
        models=(
            "efficientnet_lite0",
            "efficientnet_lite0_keras",
            "lite0_bilinear",
            "lite0_perturbed",
        ),
        parity_pairs=(
            "efficientnet_lite0;efficientnet_lite0_keras",
            "efficientnet_lite0;lite0_perturbed",
        ),
        check_interval_s=3600.0,
    )
    with ServerThread(settings) as thread:
        yield thread


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=300) as c:
        yield c


def _canary_magnitudes(client) -> dict[str, float]:
    """max |output| of the torch default on the canaries, per layer: what parity differences
    scale with (block outputs reach ~64, logits ~16)."""
    images = [s if isinstance(s, bytes) else s.to_array(1 << 30) for s in canary_inputs()]
    names = [layer.name for layer in TORCH.layers]
    out = client.extract(images, "efficientnet_lite0", layers=names, pooling="none", cache="off")
    return {name: float(np.abs(out[name]).max()) for name in names}


@pytest.mark.keras
def test_the_keras_port_agrees_with_the_torch_default_on_the_canaries(client):
    report = client.compare_models("efficientnet_lite0", "efficientnet_lite0_keras")
    assert (report.model_a.name, report.model_b.name) == (
        "efficientnet_lite0",
        "efficientnet_lite0_keras",
    )
    assert report.model_a.weights_sha256 == report.model_b.weights_sha256
    assert report.inputs == 7  # the canary set: 3 photos, 4 synthetic images
    assert report.preprocess_max_abs_diff == 0.0  # same bits once both are channels-last
    assert [p.layer for p in report.layers] == [layer.name for layer in TORCH.layers]
    scale = _canary_magnitudes(client)
    for p in report.layers:
        # max|d|/max|ref| measured 5.3e-6 (AVX-512) .. 5.4e-6 (AVX2), at most 1.7e-4 absolute;
        # 10x margin. Cosine: 1 - 5.7e-12 at worst on both.
        assert p.max_abs_diff <= 1e-4 * scale[p.layer] and p.min_cosine > 0.99999, p
        assert p.top1_agreement == (1.0 if p.layer == "logits" else -1.0), p
    assert report.first_divergence == ""


@pytest.mark.keras
def test_chosen_layers_on_real_photos(client, photos):
    report = client.compare_models(
        "efficientnet_lite0@1",
        "efficientnet_lite0_keras@1",
        layers=["features", "logits"],
        images=list(photos.values()),
    )
    assert report.inputs == 4 and [p.layer for p in report.layers] == ["features", "logits"]
    assert report.layer("logits").top1_agreement == 1.0
    assert report.first_divergence == ""


@pytest.mark.keras
def test_a_preprocessing_difference_is_found_before_any_layer(client):
    report = client.compare_models(
        "efficientnet_lite0", "lite0_bilinear", layers=["stem", "logits"]
    )
    assert report.preprocess_max_abs_diff > 0.01  # measured 0.34 on inputs of order 1
    assert report.first_divergence == "preprocess"


@pytest.mark.keras
def test_a_weights_difference_is_located_at_its_block(client):
    report = client.compare_models("efficientnet_lite0", "lite0_perturbed")
    assert report.preprocess_max_abs_diff == 0.0
    for i in range(5):
        assert report.layer(f"blocks.{i}").max_abs_diff == 0.0
    assert report.layer("blocks.5").max_abs_diff > 0.01  # measured 20 (rounding: < 2e-4)
    assert report.first_divergence == "blocks.5"


@pytest.mark.keras
def test_errors_name_what_is_wrong(client):
    with pytest.raises(NotFound, match="nope"):
        client.compare_models("efficientnet_lite0", "efficientnet_lite0_keras", layers=["nope"])
    with pytest.raises(FailedPrecondition, match="not loaded"):
        client.compare_models("efficientnet_lite0", "lite0_idle")
    with pytest.raises(InvalidArgument, match=r"model_b\.name"):
        client.compare_models("efficientnet_lite0", "")
    with pytest.raises(InvalidArgument, match="inputs"):
        client.compare_models("efficientnet_lite0", "lite0_bilinear", images=[b"not an image"])


@pytest.mark.keras
def test_cli_parity(server, photos, tmp_path):
    for name, data in photos.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
    base = ["--server", server.address, "parity"]
    pair = ["efficientnet_lite0", "efficientnet_lite0_keras", "--images", str(tmp_path)]
    result = run_cli(*base, *pair, "--layer", "logits", "--json")
    data = json.loads(result.stdout)
    assert data["inputs"] == 4 and data["first_divergence"] == ""
    assert data["layers"][0]["layer"] == "logits" and data["layers"][0]["top1_agreement"] == 1.0
    table = run_cli(*base, *pair)
    assert "blocks.15" in table.stdout and "first divergence: nowhere" in table.stdout
    bad = run_cli(*base, "efficientnet_lite0", "lite0_perturbed", "--layer", "nope", check=False)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def _sample(metric: str, pair: tuple[str, str], layer: str) -> float | None:
    return METRICS.sample(
        f"embedwarden_parity_{metric}", {"model_a": pair[0], "model_b": pair[1], "layer": layer}
    )


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.keras
def test_configured_pairs_are_exported_and_forgotten_on_unload(server, client):
    perturbed = ("efficientnet_lite0@1", "lite0_perturbed@1")
    _wait_for(lambda: _sample("top1_agreement", PAIR, "logits") is not None)
    _wait_for(lambda: _sample("max_abs_diff", perturbed, "blocks.5") is not None)
    assert _sample("top1_agreement", PAIR, "logits") == 1.0
    assert _sample("min_cosine", PAIR, "features") > 0.99999  # measured 1 - 5.7e-12 at worst
    assert _sample("max_abs_diff", PAIR, "preprocess") == 0.0
    assert _sample("top1_agreement", PAIR, "features") is None  # not a class layer
    assert _sample("max_abs_diff", perturbed, "blocks.4") == 0.0
    assert _sample("max_abs_diff", perturbed, "blocks.5") > 0.01  # measured 20
    client.unload_model("lite0_perturbed")
    _wait_for(lambda: _sample("max_abs_diff", perturbed, "blocks.5") is None)
    assert _sample("top1_agreement", PAIR, "logits") == 1.0  # the other pair stays
