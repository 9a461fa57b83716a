"""Keras models in a real server beside torch ones: the built-in Keras port next to the default,
a torchvision and a keras.applications model with seeded weights side by side, every
consistency check green, and a default server that never imports TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import (
    CAT_CLASSES,
    assert_close,
    make_settings,
    run_cli,
    seeded_keras_weights,
    seeded_torchvision_weights,
)

from embedwarden.client import Client
from embedwarden.server.backbones._torchvision_manifest import torchvision_manifest
from embedwarden.server.testing import ServerThread
from embedwarden.v1 import embedding_pb2

pytestmark = pytest.mark.keras

KERAS_FILE = "mobilenet_v2_0.35_96_seeded.weights.h5"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with default settings (the default model at start) and two seeded models
    registered from a models folder, their weights in the torch hub and Keras caches."""
    root = tmp_path_factory.mktemp("keras-server")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(root / "torch"))
    mp.setenv("KERAS_HOME", str(root / "keras"))
    seeded_torchvision_weights(root / "torch", "resnet18", "IMAGENET1K_V1", seed=3)
    seeded_keras_weights(root / "keras" / "models" / KERAS_FILE, "MobileNetV2", size=96, alpha=0.35)
    from embedwarden.server.backbones._keras_manifest import keras_manifest

    models = root / "models"
    models.mkdir()
    (models / "resnet18@1.toml").write_text(torchvision_manifest("resnet18", "IMAGENET1K_V1"))
    (models / "mobilenetv2@1.toml").write_text(
        keras_manifest("MobileNetV2", KERAS_FILE, size=96, options={"alpha": 0.35})
    )
    with ServerThread(make_settings(root / "data", models_dirs=(models,))) as thread:
        yield thread
    mp.undo()


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=300) as c:
        yield c


def test_the_default_server_serves_the_keras_port_beside_the_torch_default(
    server, photos, tmp_path
):
    run_cli("--server", server.address, "load", "efficientnet_lite0_keras")
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(photos["chelsea"])
    out = {}
    for model in ("efficientnet_lite0", "efficientnet_lite0_keras"):
        path = tmp_path / f"{model}.npz"
        run_cli(
            "--server",
            server.address,
            "extract",
            str(cat),
            "--model",
            model,
            "--layer",
            "logits",
            "--layer",
            "features",
            "--pool",
            "none",
            "--out",
            str(path),
        )
        out[model] = dict(np.load(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["model"] == model and len(meta["fingerprint"]) == 64
    torch_out, keras_out = out["efficientnet_lite0"], out["efficientnet_lite0_keras"]
    assert int(torch_out["logits"].argmax()) == int(keras_out["logits"].argmax())
    assert int(keras_out["logits"].argmax()) in CAT_CLASSES
    # max|d|/max|ref| measured 8.3e-7 (AVX-512) .. 4.1e-7 (AVX2), 1 or 2 threads; 10x margin
    assert_close(keras_out["logits"], torch_out["logits"], rel=1e-5, what="logits")
    assert torch_out["features"].shape == (1, 1280, 7, 7)
    assert keras_out["features"].shape == (1, 7, 7, 1280)
    # max|d|/max|ref| measured 4.1e-6 (AVX-512) .. 2.9e-6 (AVX2), 1 or 2 threads; 10x margin
    assert_close(
        keras_out["features"],
        torch_out["features"].transpose(0, 2, 3, 1),
        rel=5e-5,
        what="features",
    )


def test_the_response_says_which_layout_a_map_has(server, client, photos):
    client.load_model("efficientnet_lite0_keras")
    keras_result = client.extract(
        [photos["coffee"]], "efficientnet_lite0_keras", layers=["stem", "features"], pooling="none"
    )
    torch_result = client.extract(
        [photos["coffee"]], "efficientnet_lite0", layers=["stem"], pooling="none"
    )
    assert keras_result.layouts == {"stem": "HWC", "features": "HWC"}
    assert torch_result.layouts == {"stem": "CHW"}
    assert keras_result["stem"].shape == (1, 112, 112, 32)
    # max|d|/max|ref| measured 1.6e-7 (AVX-512 and AVX2); 10x margin
    assert_close(
        keras_result["stem"], torch_result["stem"].transpose(0, 2, 3, 1), rel=2e-6, what="stem"
    )


def test_a_torchvision_and_a_keras_application_model_serve_side_by_side(server, client, photos):
    client.load_model("resnet18")
    client.load_model("mobilenetv2")
    images = [photos["chelsea"], photos["rocket"]]
    first = {
        model: client.extract(images, model, layers=["logits"], cache="off")["logits"]
        for model in ("resnet18", "mobilenetv2", "efficientnet_lite0")
    }
    maps = client.extract(images, "mobilenetv2", layers=["out_relu"], pooling="none", cache="off")
    assert maps.layouts["out_relu"] == "HWC" and maps["out_relu"].shape == (2, 3, 3, 1280)
    again = {
        model: client.extract(images, model, layers=["logits"], cache="off")["logits"]
        for model in reversed(first)
    }
    for model, logits in first.items():
        assert logits.shape == (2, 1000) and np.isfinite(logits).all()
        # Interleaving models changed nothing beyond rounding: the dynamic batcher may have run
        # the two inputs together or apart, which moves float32 results by an ulp or so:
        # max|d|/max|ref| measured 8.9e-7 (AVX-512) .. 3.6e-7 (AVX2), 1 or 2 threads; 10x margin.
        assert_close(again[model], logits, rel=1e-5, what=model)
    states = {m.identity.name: m.state for m in client.list_models()}
    assert {states["resnet18"], states["mobilenetv2"]} == {embedding_pb2.MODEL_STATE_SERVING}


def test_every_consistency_check_passes_with_torch_and_keras_coloaded(server, client):
    for model in ("resnet18", "mobilenetv2", "efficientnet_lite0_keras"):
        client.load_model(model)
    report = client.check_consistency()
    failed = [
        f"{r.model.name} {r.check} {r.layer}: {r.detail}" for r in report.results if not r.passed
    ]
    assert report.passed and not failed, failed
    checked = {(r.model.name, r.check) for r in report.results}
    for model in ("efficientnet_lite0", "resnet18", "mobilenetv2", "efficientnet_lite0_keras"):
        assert (model, "weights") in checked and (model, "training_mode") in checked, model


def test_a_default_server_never_imports_tensorflow(tmp_path):
    """The whole server package, its wiring and the torch default: no TensorFlow import (it
    costs seconds and memory; only a Keras model's load pays it)."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from embedwarden.server import Application, Settings
        from embedwarden.server.backbones import load_backbone
        app = Application(Settings(port=0, metrics_port=-1, data_dir=Path({str(tmp_path)!r})))
        backbone, _ = load_backbone(app.registry.resolve("efficientnet_lite0"), "cpu")
        backbone.infer(__import__("numpy").zeros((1, 3, 224, 224), "float32"), ["logits"])
        print("tensorflow" in sys.modules, "keras" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False"]
