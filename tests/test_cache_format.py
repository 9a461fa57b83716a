"""The cache's keys and entry format: every key field matters, any damaged byte is detected."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedwarden.server.cache._format import (
    HEADER_BYTES,
    KEY_BYTES,
    CorruptEntry,
    KeyMaker,
    decode_entry,
    encode_entry,
    entry_info,
    fingerprint_prefix,
)
from embedwarden.server.models._preprocess import RawImage
from embedwarden.server.serving._extraction import input_digest

FP = hashlib.sha256(b"model version A").hexdigest()
FP_B = hashlib.sha256(b"model version B").hexdigest()
DIGEST = hashlib.sha256(b"image bytes").digest()


def one_key(*spec_and_digest: Any, maker: KeyMaker | None = None) -> bytes:
    """The key of one input: (fingerprint, layer, pooling, dtype, normalize, digest)."""
    *spec, digest = spec_and_digest
    return (maker or KeyMaker()).many(*spec, [digest])[0]


def test_key_is_the_fingerprint_prefix_then_sha256_of_every_field():
    key = one_key(FP, "features", "avg", "float32", False, DIGEST)
    assert len(key) == KEY_BYTES == 40
    assert key[:8] == bytes.fromhex(FP)[:8] == fingerprint_prefix(FP)
    base = (FP, "features", "avg", "float32", False, DIGEST)
    variants = [
        (FP_B, *base[1:]),
        (FP, "logits", *base[2:]),
        (FP, "features", "max", *base[3:]),
        (FP, "features", "avg", "float16", False, DIGEST),
        (FP, "features", "avg", "float32", True, DIGEST),
        (*base[:5], hashlib.sha256(b"other image").digest()),
    ]
    keys = {one_key(*v) for v in variants} | {key}
    assert KeyMaker().many(*base[:5], [DIGEST, DIGEST[::-1]])[0] == key
    assert len(keys) == len(variants) + 1  # each field changes the key
    # Field boundaries are unambiguous: moving a character from one field to the next.
    assert one_key(FP, "ab", "c", "float32", False, DIGEST) != one_key(
        FP, "a", "bc", "float32", False, DIGEST
    )
    maker = KeyMaker(memo_limit=1)  # memoised prefix state gives the same keys
    assert [one_key(*v, maker=maker) for v in (base, variants[0], base)] == [
        key,
        one_key(*variants[0]),
        key,
    ]


def test_input_digest_covers_raw_shape_and_dtype():
    data = bytes(range(12))
    a = input_digest(RawImage(data, (2, 2, 3), "uint8"))
    b = input_digest(RawImage(data, (1, 4, 3), "uint8"))
    assert a != b and input_digest(data) not in (a, b)
    assert input_digest(data) == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(1280, dtype=np.float32),
        np.linspace(-1, 1, 1000).astype(np.float16),
        np.random.default_rng(0).standard_normal((3, 7, 7)).astype(np.float32),
        np.float32(3.5).reshape(()),
        np.zeros((0,), np.float32),
    ],
)
def test_round_trip_is_byte_identical(array):
    key = one_key(FP, "features", "none", array.dtype.name, False, DIGEST)
    value = encode_entry(key, FP, array, 1_700_000_000.5)
    out = decode_entry(key, value)
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes()
    assert not out.flags.writeable  # served straight from the stored bytes
    info = entry_info(value)
    assert (info.fingerprint, info.created, info.dtype, info.shape) == (
        FP,
        1_700_000_000.5,
        array.dtype.name,
        array.shape,
    )
    assert len(value) == HEADER_BYTES + 4 * array.ndim + array.nbytes


def test_non_contiguous_and_big_endian_arrays_are_stored_as_their_values():
    key = one_key(FP, "features", "none", "float32", False, DIGEST)
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for array in (base[:, ::2], base.astype(">f4")):
        out = decode_entry(key, encode_entry(key, FP, array, 0.0))
        np.testing.assert_array_equal(out, array)


def test_unsupported_arrays_are_refused_at_encode():
    key = one_key(FP, "features", "none", "float32", False, DIGEST)
    with pytest.raises(ValueError, match="cannot cache"):
        encode_entry(key, FP, np.zeros(3, np.float64), 0.0)


_KEY = one_key(FP, "features", "avg", "float32", False, DIGEST)
_VALUE = encode_entry(_KEY, FP, np.arange(64, dtype=np.float32), 1.0)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALUE) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_detected(position, xor):
    damaged = bytearray(_VALUE)
    damaged[position] ^= xor
    with pytest.raises(CorruptEntry):
        decode_entry(_KEY, bytes(damaged))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(_VALUE) - 1))
def test_truncated_entries_are_detected(length):
    with pytest.raises(CorruptEntry):
        decode_entry(_KEY, _VALUE[:length])


def test_an_entry_is_only_valid_under_its_own_key():
    other = one_key(FP, "features", "avg", "float32", False, hashlib.sha256(b"x").digest())
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_entry(other, _VALUE)
