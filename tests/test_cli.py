"""The `embedwarden` command line, run as a new user would (a real subprocess)."""

from __future__ import annotations

import json

import numpy as np
from helpers import CAT_CLASSES, run_cli, seeded_torchvision_weights


def test_extract_a_cat_photo_to_npy(server, photos, tmp_path):
    cat = tmp_path / "cat.jpg"
    cat.write_bytes(photos["chelsea"])
    out = tmp_path / "logits.npy"
    run_cli(
        "--server",
        server.address,
        "extract",
        str(cat),
        "--model",
        "efficientnet_lite0",
        "--layer",
        "logits",
        "--out",
        str(out),
    )
    logits = np.load(out)
    assert logits.shape == (1, 1000)
    assert set(np.argsort(logits[0])[::-1][:3].tolist()) <= CAT_CLASSES
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["version"] == "1" and len(meta["fingerprint"]) == 64
    assert meta["inputs"] == [str(cat)]


def test_extract_a_folder_keeps_sorted_input_order(server, photos, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, data in photos.items():
        (folder / ("sub" if name == "rocket" else "") / f"{name}.jpg").write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "features.npy"
    env = {"EMBEDWARDEN_SERVER": server.address}
    run_cli(
        "extract",
        str(folder),
        "--model",
        "efficientnet_lite0@1",
        "--layer",
        "features",
        "--pool",
        "avg",
        "--batch-size",
        "2",
        "--out",
        str(out),
        env=env,
    )
    features = np.load(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert features.shape == (4, 1280)
    assert [p.rsplit("/", 1)[-1] for p in meta["inputs"]] == [
        "astronaut.jpg",
        "chelsea.jpg",
        "coffee.jpg",
        "rocket.jpg",
    ]


def test_models_and_describe(server):
    listing = run_cli("--server", server.address, "models").stdout
    assert "efficientnet_lite0@1" in listing and "serving" in listing
    models = json.loads(run_cli("--server", server.address, "models", "--json").stdout)
    assert "efficientnet_lite0" in [m["identity"]["name"] for m in models]
    described = run_cli("--server", server.address, "describe", "efficientnet_lite0").stdout
    assert "bicubic" in described and "features" in described and "(default)" in described
    info = json.loads(
        run_cli("--server", server.address, "describe", "efficientnet_lite0", "--json").stdout
    )
    assert str(info["preprocessing"]["size"]) == "224"  # int64 is a JSON string


def test_errors_are_one_line_with_a_nonzero_exit(server, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    result = run_cli(
        "--server",
        server.address,
        "extract",
        str(bad),
        "--model",
        "efficientnet_lite0",
        "--out",
        str(tmp_path / "x.npy"),
        check=False,
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--server", server.address, "describe", "nope", check=False)
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


def test_manifest_for_a_torchvision_model_from_the_hub_cache(tmp_path):
    seeded_torchvision_weights(tmp_path, "resnet18", "IMAGENET1K_V1")
    out = tmp_path / "resnet18.toml"
    run_cli(
        "manifest",
        "torchvision",
        "resnet18",
        "IMAGENET1K_V1",
        "--out",
        str(out),
        env={"TORCH_HOME": str(tmp_path)},
    )
    text = out.read_text()
    assert 'builder = "torchvision:resnet18"' in text and "resize_size = 256" in text
