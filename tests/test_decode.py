"""The decode contract through a real server, for each kind of real-world file, against pixels
computed here (numpy, and Pillow only to read what a file stores): the built-in version keeps
what it always did (LEGACY), a version with the recommended contract (`lite0_phone@1`, the same
weights) applies EXIF orientation and ICC profiles, composites alpha on white, reads GIFs and
16-bit greyscale PNGs. A raw RGB array is used as sent, so "file == raw array of the pixels the
contract prescribes" is the check."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import encode, make_settings, swapped_primaries_profile
from PIL import Image

from embedwarden.client import Client, InvalidArgument
from embedwarden.server import build_registry, parse_manifest
from embedwarden.server.models import LEGACY_DECODE, RECOMMENDED_DECODE, decode
from embedwarden.server.testing import ServerThread

LEGACY = "efficientnet_lite0"
PHONE = "lite0_phone"
BUILTIN_TEXT = build_registry().resolve(LEGACY).text
PHONE_DECODE = """[decode]
formats = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]
exif = "apply"
icc = "convert_to_srgb"
alpha = "composite"
background = [255, 255, 255]
grayscale = "replicate"
palette = "expand"
cmyk = "naive"
sixteen_bit = "high_byte"
frames = "first"
"""


def phone_manifest() -> str:
    text = BUILTIN_TEXT
    start, end = text.index("[decode]"), text.index("[numerics]")
    text = text[:start] + PHONE_DECODE + "\n" + text[end:]
    text = text.replace('name = "efficientnet_lite0"', f'name = "{PHONE}"')
    return text.replace("default = true\n", "")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("models")
    (models / f"{PHONE}@1.toml").write_text(phone_manifest())
    settings = make_settings(
        tmp_path_factory.mktemp("decode-data"), models=(LEGACY, PHONE), models_dirs=(models,)
    )
    with ServerThread(settings) as thread:
        yield thread


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=300) as c:
        yield c


def embed(client: Client, model: str, image: bytes | np.ndarray) -> np.ndarray:
    return client.extract([image], model, layers="features", cache="off").array[0]


def stored(data: bytes, mode: str | None = None) -> np.ndarray:
    """The pixels as the file stores them (Pillow reads them; no conversion)."""
    image = Image.open(io.BytesIO(data))
    return np.asarray(image if mode is None else image.convert(mode))


# The built-in versions' fingerprints from before the [decode] table existed (their vectors,
# cache entries and golden records stay valid).
FINGERPRINTS = {
    "efficientnet_lite0": "afb24615fc6100d81e6ab022067f5f7a97e7b2f3c733ac8ad09df87f6fa40fdb",
    "efficientnet_lite0_keras": "8875dba645a36f19c6a7cdc455c645e772975ba89834736e1837e1d2b3e70fcd",
}


def test_the_built_in_versions_declare_the_legacy_contract_and_keep_their_fingerprints():
    registry = build_registry()
    for name, fingerprint in FINGERPRINTS.items():
        manifest = registry.resolve(name)
        assert "[decode]" in manifest.text
        assert manifest.preprocess.decode == LEGACY_DECODE
        assert manifest.fingerprint() == fingerprint, name


def test_the_recommended_manifest_parses_to_the_recommended_contract():
    manifest = parse_manifest(phone_manifest())
    assert manifest.preprocess.decode == RECOMMENDED_DECODE
    assert parse_manifest(BUILTIN_TEXT).preprocess.decode == LEGACY_DECODE
    # Any field changes the fingerprint; the legacy table keeps the pre-table fingerprint.
    assert (
        manifest.fingerprint()
        != parse_manifest(
            phone_manifest().replace('exif = "apply"', 'exif = "ignore"')
        ).fingerprint()
    )
    without_table = BUILTIN_TEXT
    start, end = without_table.index("[decode]"), without_table.index("[numerics]")
    without_table = without_table[:start] + without_table[end:]
    assert parse_manifest(without_table).fingerprint() == parse_manifest(BUILTIN_TEXT).fingerprint()


def test_describe_model_states_every_decode_field(client):
    phone = client.describe_model(PHONE).preprocessing.decoding
    assert (phone.exif, phone.icc, phone.alpha, phone.sixteen_bit) == (
        "apply",
        "convert_to_srgb",
        "composite",
        "high_byte",
    )
    assert list(phone.background) == [255, 255, 255] and "GIF" in phone.formats
    legacy = client.describe_model(LEGACY).preprocessing.decoding
    assert (legacy.exif, legacy.icc, legacy.alpha, legacy.frames) == (
        "ignore",
        "ignore",
        "drop",
        "first",
    )
    assert "GIF" not in legacy.formats


def test_exif_orientation_applied_or_ignored_as_declared(client, photo_arrays):
    """Chelsea stored turned 90 degrees counter-clockwise with orientation 6, as phones do."""
    upright = photo_arrays["chelsea"][:288, :448]  # whole 16-pixel blocks: rotation-stable JPEG
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(
        np.ascontiguousarray(np.rot90(upright)),
        "JPEG",
        quality=100,
        subsampling=0,
        exif=exif.tobytes(),
    )
    pixels = stored(turned)
    np.testing.assert_array_equal(
        embed(client, PHONE, turned),
        embed(client, PHONE, np.ascontiguousarray(np.rot90(pixels, -1))),
    )
    np.testing.assert_array_equal(embed(client, LEGACY, turned), embed(client, LEGACY, pixels))
    # Against the upright photo's own file: JPEG re-encoding moves pixels by up to 3 levels
    # (features by 1.4% here), so that comparison is made losslessly, with PNG's eXIf chunk.
    turned_png = encode(np.ascontiguousarray(np.rot90(upright)), "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(
        embed(client, PHONE, turned_png), embed(client, PHONE, encode(upright, "PNG"))
    )


def test_rgba_is_composited_on_white_or_dropped(client, photo_arrays):
    rgb = photo_arrays["coffee"]
    h, w, _ = rgb.shape
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))  # transparent on the left
    data = encode(np.dstack([rgb, alpha]), "PNG")
    a = alpha[..., None].astype(np.float64)
    on_white = np.round((a * rgb + (255 - a) * 255) / 255).astype(np.uint8)
    # Pillow's alpha_composite rounds as this formula does: bit-identical (measured).
    np.testing.assert_array_equal(embed(client, PHONE, data), embed(client, PHONE, on_white))
    np.testing.assert_array_equal(embed(client, LEGACY, data), embed(client, LEGACY, rgb))


def test_palette_greyscale_and_cmyk_convert_as_stated(client, photo_arrays):
    photo = photo_arrays["rocket"]
    palette_image = Image.fromarray(photo).quantize(256)
    palette = np.array(palette_image.getpalette()[: 256 * 3], np.uint8).reshape(-1, 3)
    buf = io.BytesIO()
    palette_image.save(buf, "PNG")
    expanded = palette[np.asarray(Image.open(io.BytesIO(buf.getvalue())))]
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    cmyk_file = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk_file, "JPEG", quality=95)
    c, m, y, k = np.moveaxis(stored(cmyk_file.getvalue()).astype(np.int64), -1, 0)
    naive = np.stack([(255 - x) * (255 - k) for x in (c, m, y)], axis=-1)
    cmyk_rgb = ((naive + 127) // 255).astype(np.uint8)
    for model in (LEGACY, PHONE):
        for data, pixels in (
            (buf.getvalue(), expanded),
            (encode(grey, "PNG"), np.dstack([grey] * 3)),
            (cmyk_file.getvalue(), cmyk_rgb),
        ):
            np.testing.assert_array_equal(embed(client, model, data), embed(client, model, pixels))


def test_an_embedded_icc_profile_is_converted_to_srgb_or_ignored(client, photo_arrays):
    photo = photo_arrays["coffee"]
    data = encode(photo, "PNG", icc_profile=swapped_primaries_profile())
    np.testing.assert_array_equal(
        embed(client, PHONE, data), embed(client, PHONE, np.ascontiguousarray(photo[..., ::-1]))
    )
    np.testing.assert_array_equal(embed(client, LEGACY, data), embed(client, LEGACY, photo))


def test_16_bit_greyscale_is_reduced_to_its_high_byte_or_refused(client, photo_arrays):
    grey = np.asarray(Image.fromarray(photo_arrays["astronaut"]).convert("L")).astype(np.uint16)
    deep = grey * 257 + np.random.default_rng(0).integers(0, 257, grey.shape).astype(np.uint16)
    data = encode(deep, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    high = (deep >> 8).astype(np.uint8)
    np.testing.assert_array_equal(
        embed(client, PHONE, data), embed(client, PHONE, np.dstack([high] * 3))
    )
    with pytest.raises(InvalidArgument, match="mode 'I;16' is not supported"):
        embed(client, LEGACY, data)


def test_gifs_are_read_first_frame_or_refused_and_multi_frame_files_use_frame_one(
    client, photo_arrays
):
    frames = [
        Image.fromarray(photo_arrays[n][:300, :400]).quantize(256) for n in ("coffee", "rocket")
    ]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = buf.getvalue()
    first = np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"))
    palette = np.array(frames[0].getpalette()[: 256 * 3], np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(first, palette[np.asarray(frames[0])])  # the first frame
    np.testing.assert_array_equal(embed(client, PHONE, gif), embed(client, PHONE, first))
    with pytest.raises(InvalidArgument, match="could not identify the image"):
        embed(client, LEGACY, gif)
    pages = [photo_arrays["chelsea"], photo_arrays["coffee"][:300, :451]]
    tiff = io.BytesIO()
    Image.fromarray(pages[0]).save(
        tiff, "TIFF", save_all=True, append_images=[Image.fromarray(pages[1])]
    )
    for model in (LEGACY, PHONE):
        np.testing.assert_array_equal(
            embed(client, model, tiff.getvalue()), embed(client, model, pages[0])
        )


def test_frames_refuse_names_the_frame_count(photo_arrays):
    buf = io.BytesIO()
    pages = [Image.fromarray(photo_arrays["chelsea"]) for _ in range(3)]
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    from dataclasses import replace

    from embedwarden.server import InvalidInput

    with pytest.raises(InvalidInput, match="has 3 frames"):
        decode(buf.getvalue(), 40_000_000, replace(RECOMMENDED_DECODE, frames="refuse"))
    assert decode(buf.getvalue(), 40_000_000, RECOMMENDED_DECODE).size == (451, 300)


def test_verify_diagnoses_a_pipeline_that_ignores_the_orientation_tag(client, photo_arrays):
    """The legacy version is the same weights with exif = "ignore": its vectors are what a
    pipeline that forgets the tag produces for the recommended version."""
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(
        np.ascontiguousarray(np.rot90(photo_arrays["coffee"])), "JPEG", exif=exif.tobytes()
    )
    forgetful = client.extract([turned], LEGACY, layers="features").array
    report = client.verify([turned], forgetful, PHONE, layer="features", pipeline="no-exif")
    assert report.failed == 1
    best = report.items[0].diagnosis[0]
    assert (best.mistake, best.reproduces) == ("exif_ignored", True), report.items[0].diagnosis
