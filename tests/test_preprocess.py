"""Preprocessing is exactly the pinned reference; bad images are the caller's error."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from helpers import encode
from PIL import Image

from embedwarden.server import InvalidInput, LimitExceeded, build_registry
from embedwarden.server.models._manifest import PreprocessSpec
from embedwarden.server.models._preprocess import Preprocessor, RawImage, decode

MAX_PIXELS = 40_000_000


def torchvision_spec(arch: str, weights: str) -> PreprocessSpec:
    import torchvision

    t = torchvision.models.get_model_weights(arch)[weights].transforms()
    return PreprocessSpec(
        decoder="pillow",
        color_order="RGB",
        resize_mode="resize_crop",
        resize_size=t.resize_size[0],
        size=t.crop_size[0],
        interpolation=t.interpolation.value,
        antialias=True,
        divisor=255.0,
        mean=tuple(t.mean),
        std=tuple(t.std),
        layout="NCHW",
    )


@pytest.mark.parametrize(
    ("arch", "weights"),
    [
        ("resnet50", "IMAGENET1K_V2"),
        ("efficientnet_b0", "IMAGENET1K_V1"),
        ("vit_b_16", "IMAGENET1K_V1"),
    ],
)
@pytest.mark.parametrize("photo", ["chelsea", "rocket", "astronaut"])
def test_resize_crop_is_bit_identical_to_torchvision_transforms(photo_arrays, arch, weights, photo):
    import torchvision

    image = Image.fromarray(photo_arrays[photo])
    reference = torchvision.models.get_model_weights(arch)[weights].transforms()(image).numpy()
    ours = Preprocessor(torchvision_spec(arch, weights))(image)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert np.array_equal(ours, reference)


def test_efficientnet_lite_crop_matches_the_official_recipe(photo_arrays):
    spec = build_registry().resolve("efficientnet_lite0").preprocess
    image = Image.fromarray(photo_arrays["chelsea"])  # 451 x 300
    crop = int(224 / (224 + 32) * 300)  # official: int(size / (size + 32) * short side)
    top, left = (300 - crop + 1) // 2, (451 - crop + 1) // 2
    expected_pixels = np.asarray(
        image.crop((left, top, left + crop, top + crop)).resize((224, 224), Image.BICUBIC)
    )
    expected = (expected_pixels.astype(np.float32) - np.float32(127)) / np.float32(128)
    ours = Preprocessor(spec)(image)
    assert np.array_equal(ours, expected.transpose(2, 0, 1))


def test_bgr_and_nhwc_follow_the_spec(photo_arrays):
    spec = PreprocessSpec(
        decoder="pillow",
        color_order="BGR",
        resize_mode="resize",
        size=32,
        interpolation="bilinear",
        antialias=True,
        divisor=1.0,
        mean=(103.939, 116.779, 123.68),
        std=(1.0, 1.0, 1.0),
        layout="NHWC",
    )
    image = Image.fromarray(photo_arrays["coffee"])
    pixels = np.asarray(image.resize((32, 32), Image.BILINEAR)).astype(np.float32)
    expected = pixels[..., ::-1] - np.array(spec.mean, dtype=np.float32)
    assert np.array_equal(Preprocessor(spec)(image), expected)


def test_raw_arrays_equal_their_lossless_encoding(photo_arrays):
    spec = build_registry().resolve("efficientnet_lite0").preprocess
    array = photo_arrays["rocket"]
    raw = RawImage(array.tobytes(), array.shape, "uint8")
    pre = Preprocessor(spec)
    assert np.array_equal(
        pre.prepare(raw, MAX_PIXELS), pre.prepare(encode(array, "PNG"), MAX_PIXELS)
    )


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(photo_arrays, fmt):
    params = {"lossless": True} if fmt == "WEBP" else {}
    image = decode(encode(photo_arrays["coffee"], fmt, **params), MAX_PIXELS)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), photo_arrays["coffee"])


def test_grayscale_palette_and_alpha_are_converted(photo_arrays):
    gray = np.asarray(Image.fromarray(photo_arrays["coffee"]).convert("L"))
    assert decode(encode(gray, "PNG"), MAX_PIXELS).mode == "RGB"
    rgba = np.dstack([photo_arrays["coffee"], np.full(gray.shape, 128, np.uint8)])
    assert np.array_equal(
        np.asarray(decode(encode(rgba, "PNG"), MAX_PIXELS)), photo_arrays["coffee"]
    )


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: IHDR, a few bytes of IDAT, IEND."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidInput, "empty"),
        (b"not an image at all", InvalidInput, "could not identify"),
        (b"GIF89a" + b"\0" * 20, InvalidInput, "could not identify"),
        (_png_header(100_000, 100_000), LimitExceeded, "pixels"),
        (_png_header(20_000, 5_000), LimitExceeded, "pixels"),
    ],
)
def test_bad_bytes_are_invalid_input(data, error, message):
    with pytest.raises(error, match=message):
        decode(data, MAX_PIXELS)


def test_truncated_and_corrupt_jpegs_are_invalid_input(photos):
    jpeg = photos["chelsea"]
    with pytest.raises(InvalidInput, match=r"decode|header"):
        decode(jpeg[: len(jpeg) // 2], MAX_PIXELS)
    corrupt = bytearray(jpeg)
    corrupt[200:4000] = bytes(3800)
    try:
        image = decode(bytes(corrupt), MAX_PIXELS)
    except InvalidInput:
        return  # refused: fine
    assert image.mode == "RGB" and image.size == (451, 300)  # or decoded with grey blocks


def test_sixteen_bit_images_are_refused_with_advice():
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(buf, "PNG")
    with pytest.raises(InvalidInput, match="8-bit"):
        decode(buf.getvalue(), MAX_PIXELS)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (RawImage(b"\0" * 12, (2, 2, 3), "float32"), "uint8"),
        (RawImage(b"\0" * 16, (2, 2, 4), "uint8"), r"\[height, width, 3\]"),
        (RawImage(b"\0" * 11, (2, 2, 3), "uint8"), "bytes"),
        (RawImage(b"", (0, 2, 3), "uint8"), "empty"),
        (RawImage(b"", (2,), "uint8"), r"\[height, width, 3\]"),
    ],
)
def test_bad_raw_arrays_are_invalid_input(raw, message):
    with pytest.raises(InvalidInput, match=message):
        decode(raw, MAX_PIXELS)
