"""Text manifests and text inputs without a server: strict [tokenizer] parsing, what the
fingerprint covers, masked token pooling, UTF-8 and size checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedwarden.server._errors import InvalidInput, LimitExceeded, ManifestError
from embedwarden.server.models import (
    MAX_TEXT_BYTES,
    Pooling,
    TextInput,
    build_registry,
    check_text,
    parse_manifest,
    pool,
)

TORCH = "all_minilm_l6_v2"


@pytest.fixture(scope="module")
def text() -> str:
    return build_registry().resolve(TORCH).text


def test_the_builtin_text_manifests_pin_tokenizer_and_layers():
    registry = build_registry()
    for ref in (TORCH, "all_minilm_l6_v2_onnx_int8"):
        m = registry.resolve(ref)
        assert m.modality == "text" and m.tokenizer is not None
        assert m.tokenizer.max_length == 256 and m.tokenizer.lowercase
        assert set(m.tokenizer.files) >= {"tokenizer.json", "vocab.txt"}
        canonical = m.canonical()
        assert "preprocess" not in canonical and "package" not in canonical["tokenizer"]
        tokens = [layer for layer in m.layers if layer.tokens]
        assert tokens and all(l.masked and l.layout == "TC" for l in tokens)  # noqa: E741
    names = [layer.name for layer in registry.resolve(TORCH).layers]
    assert names == ["pooled"] + [f"hidden.{k}" for k in range(7)]


def test_image_manifests_hash_as_before_the_text_fields():
    image = build_registry().resolve("efficientnet_lite0")
    canonical = json.loads(image.canonical_json())
    assert "tokenizer" not in canonical
    assert all("masked" not in layer for layer in canonical["layers"])


def test_the_fingerprint_covers_tokenizer_files_and_settings_not_their_location(text):
    base = parse_manifest(text).fingerprint()
    vocab = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    assert parse_manifest(text.replace(vocab, "0" * 64)).fingerprint() != base
    assert (
        parse_manifest(text.replace("max_length = 256", "max_length = 128")).fingerprint() != base
    )
    assert (
        parse_manifest(text.replace('path = "model"', 'path = "elsewhere"')).fingerprint() == base
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('truncation_side = "right"', 'truncation_side = "middle"'), "truncation_side"),
        (("lowercase = true", "lowercase = true\nstrip = true"), "unknown keys"),
        (('pooling = "mean"', 'pooling = "max"'), "pooling"),
        (("max_length = 256", "max_length = 1"), "max_length"),
        (('"vocab.txt" = "07eced', '"vocab.txt" = "zz'), "SHA-256"),
        (("[tokenizer]", "[preprocess]\nsize = 224\n\n[tokenizer]"), "instead of \\[preprocess\\]"),
        (("masked = true", "masked = true\nmode = 1"), "unknown keys"),
    ],
)
def test_text_manifests_are_parsed_strictly(text, change, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text.replace(*change, 1))


def test_only_token_layers_can_be_masked(text):
    broken = text.replace(
        'node = "pooled"\nshape = [384]', 'node = "pooled"\nshape = [384]\nmasked = true'
    )
    with pytest.raises(ManifestError, match="only token layers"):
        parse_manifest(broken)


def test_token_mean_on_a_masked_layer_ignores_padding_rows():
    layer = build_registry().resolve(TORCH).layer("hidden.6")
    states = np.zeros(layer.shape, np.float32)
    states[:3] = [[1.0] * 384, [2.0] * 384, [6.0] * 384]  # three real tokens, then padding
    assert np.array_equal(pool(states, layer, Pooling.TOKEN_MEAN), np.full(384, 3.0, np.float32))
    assert np.array_equal(pool(states, layer, Pooling.CLS), np.ones(384, np.float32))


def test_texts_are_checked_for_utf8_emptiness_and_size():
    assert check_text(TextInput.of("Zürich ☕")) == "Zürich ☕"
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        check_text(TextInput(b"caf\xe9"))
    with pytest.raises(InvalidInput, match="empty"):
        check_text(TextInput.of(" \n\t"))
    with pytest.raises(LimitExceeded, match=f"limit is {MAX_TEXT_BYTES} bytes"):
        check_text(TextInput(b"a" * (MAX_TEXT_BYTES + 1)))
