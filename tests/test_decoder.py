"""`[preprocess] decoder`: `pillow` (the default, what every existing manifest states) or `nvjpeg`
(JPEGs decoded on the GPU). Parsing, the fingerprint, the refusal to load an nvjpeg version
without CUDA, and the host-side steps around nvJPEG (routing by format, EXIF orientation, ICC),
checked here with a stand-in for the GPU decode. The real nvJPEG is in test_gpu.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import encode, make_settings, swapped_primaries_profile
from PIL import Image

from embedwarden.client import Client, FailedPrecondition
from embedwarden.server import FailedPrecondition as ServerFailedPrecondition
from embedwarden.server import (
    InvalidInput,
    LimitExceeded,
    ManifestError,
    build_registry,
    parse_manifest,
)
from embedwarden.server.models import (
    LEGACY_DECODE,
    RECOMMENDED_DECODE,
    _nvjpeg,
    decode,
    require_decoder,
)
from embedwarden.server.testing import ServerThread

REGISTRY = build_registry()
BUILTIN = REGISTRY.resolve("efficientnet_lite0")
PILLOW = 'decoder = "pillow"'
NVJPEG = 'decoder = "nvjpeg"'
# The built-in versions' fingerprints before the decoder option existed: they must not move.
FINGERPRINTS = {
    "efficientnet_lite0": "afb24615fc6100d81e6ab022067f5f7a97e7b2f3c733ac8ad09df87f6fa40fdb",
    "efficientnet_lite0_keras": "8875dba645a36f19c6a7cdc455c645e772975ba89834736e1837e1d2b3e70fcd",
}
MAX_PIXELS = 40_000_000


def nvjpeg_manifest(name: str = "lite0_nvjpeg") -> str:
    text = BUILTIN.text.replace('name = "efficientnet_lite0"', f'name = "{name}"')
    assert PILLOW in text
    return text.replace(PILLOW, NVJPEG).replace("default = true\n", "")


# --- the manifest --------------------------------------------------------------------------


def test_every_built_in_version_states_pillow_and_keeps_its_fingerprint():
    for name, fingerprint in FINGERPRINTS.items():
        manifest = REGISTRY.resolve(name)
        assert PILLOW in manifest.text
        assert manifest.preprocess.decoder == "pillow"
        assert manifest.fingerprint() == fingerprint, name


def test_nvjpeg_parses_and_has_its_own_fingerprint():
    nvjpeg = parse_manifest(nvjpeg_manifest("efficientnet_lite0"))
    assert nvjpeg.preprocess.decoder == "nvjpeg"
    assert nvjpeg.preprocess.decode == LEGACY_DECODE  # the rest of the contract as it was
    assert nvjpeg.fingerprint() != BUILTIN.fingerprint()
    assert '"decoder":"nvjpeg"' in nvjpeg.canonical_json()
    # Only the decoder differs between the two canonical forms.
    assert nvjpeg.canonical_json().replace("nvjpeg", "pillow") == BUILTIN.canonical_json()


def test_an_unknown_decoder_is_refused_naming_the_key_and_the_choices():
    for value in ("libjpeg", "NVJPEG", "cuda"):
        with pytest.raises(ManifestError, match=r"preprocess\.decoder.*'pillow', 'nvjpeg'"):
            parse_manifest(BUILTIN.text.replace(PILLOW, f'decoder = "{value}"'))
    with pytest.raises(ManifestError, match="missing required key 'decoder'"):
        parse_manifest(BUILTIN.text.replace(PILLOW + "\n", ""))
    with pytest.raises(ManifestError, match="decoder 'libjpeg' is not one of"):
        require_decoder("libjpeg", "x@1")


# --- refusing to load without CUDA ----------------------------------------------------------


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
def test_require_decoder_refuses_nvjpeg_without_cuda():
    require_decoder("pillow", "x@1")  # always available
    with pytest.raises(ServerFailedPrecondition, match="no CUDA device") as caught:
        require_decoder("nvjpeg", "lite0_nvjpeg@1")
    message = str(caught.value)
    assert "lite0_nvjpeg@1" in message and "does not fall back to Pillow" in message


@needs_no_cuda
def test_a_server_without_cuda_refuses_to_load_an_nvjpeg_version(tmp_path, photos):
    models = tmp_path / "models"
    models.mkdir()
    (models / "lite0_nvjpeg@1.toml").write_text(nvjpeg_manifest())
    settings = make_settings(tmp_path / "data", models=(), models_dirs=(models,))
    with ServerThread(settings) as thread, Client(thread.address) as client:
        with pytest.raises(FailedPrecondition, match="decoder = 'nvjpeg'") as caught:
            client.load_model("lite0_nvjpeg")
        assert "no CUDA device is available" in caught.value.details
        assert client.health("model:lite0_nvjpeg@1") == "NOT_SERVING"
        (state,) = (m for m in client.list_models() if m.identity.name == "lite0_nvjpeg")
        assert "does not fall back to Pillow" in state.state_detail
        with pytest.raises(FailedPrecondition, match="failed to load"):
            client.extract([photos["chelsea"]], "lite0_nvjpeg")
        info = client.describe_model("lite0_nvjpeg")  # the registered version still shows
        assert info.preprocessing.decoder == "nvjpeg"
        assert client.describe_model("efficientnet_lite0").preprocessing.decoder == "pillow"


# --- the host-side steps around nvJPEG, with a stand-in for the GPU decode --------------------


@pytest.fixture()
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """nvJPEG replaced by "Pillow's pixels, inverted" (so its output is recognisable); returns
    the list of files it was asked to decode."""
    calls: list[bytes] = []

    def decode_rgb(data: bytes, width: int, height: int) -> np.ndarray:
        calls.append(data)
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert pixels.shape == (height, width, 3)
        return 255 - pixels

    monkeypatch.setattr(_nvjpeg, "decode_rgb", decode_rgb)
    return calls


def test_colour_jpegs_go_to_nvjpeg_and_everything_else_to_pillow(fake_gpu, photo_arrays):
    chelsea = photo_arrays["chelsea"]
    jpeg = encode(chelsea, "JPEG", quality=90)
    stored = np.asarray(Image.open(io.BytesIO(jpeg)))
    got = np.asarray(decode(jpeg, MAX_PIXELS, LEGACY_DECODE, "nvjpeg"))
    np.testing.assert_array_equal(got, 255 - stored)
    assert fake_gpu == [jpeg]
    pillow = np.asarray(decode(jpeg, MAX_PIXELS, LEGACY_DECODE, "pillow"))
    np.testing.assert_array_equal(pillow, stored)
    assert len(fake_gpu) == 1  # the pillow decoder never calls nvJPEG
    # PNG, and a greyscale JPEG: Pillow, with the contract's own rules.
    png = encode(chelsea, "PNG")
    np.testing.assert_array_equal(np.asarray(decode(png, MAX_PIXELS, decoder="nvjpeg")), chelsea)
    grey = encode(chelsea[..., 0], "JPEG", quality=90)
    level = np.asarray(Image.open(io.BytesIO(grey)))
    replicated = np.asarray(decode(grey, MAX_PIXELS, LEGACY_DECODE, "nvjpeg"))
    np.testing.assert_array_equal(replicated, np.dstack([level] * 3))
    assert len(fake_gpu) == 1


def test_exif_orientation_and_the_pixel_limit_hold_on_the_nvjpeg_path(fake_gpu, photo_arrays):
    chelsea = photo_arrays["chelsea"]  # 300 x 451
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 270 degrees to be upright
    buffer = io.BytesIO()
    Image.fromarray(chelsea).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    data = buffer.getvalue()
    stored = np.asarray(Image.open(io.BytesIO(data)))
    upright = np.asarray(decode(data, MAX_PIXELS, RECOMMENDED_DECODE, "nvjpeg"))
    np.testing.assert_array_equal(upright, np.rot90(255 - stored, k=-1))
    as_stored = np.asarray(decode(data, MAX_PIXELS, LEGACY_DECODE, "nvjpeg"))  # exif = ignore
    np.testing.assert_array_equal(as_stored, 255 - stored)
    calls = len(fake_gpu)
    with pytest.raises(LimitExceeded, match="pixels; the limit is 1000"):
        decode(data, 1000, LEGACY_DECODE, "nvjpeg")
    assert len(fake_gpu) == calls  # refused from the header, before any decode


def test_an_embedded_icc_profile_is_converted_after_nvjpeg(fake_gpu, photo_arrays):
    """nvJPEG ignores the profile; the contract's conversion runs on its pixels (a profile with
    red and blue exchanged: the converted pixels are the decoded ones with R and B swapped)."""
    data = encode(
        photo_arrays["chelsea"], "JPEG", quality=90, icc_profile=swapped_primaries_profile()
    )
    gpu_pixels = 255 - np.asarray(Image.open(io.BytesIO(data)))
    converted = np.asarray(decode(data, MAX_PIXELS, RECOMMENDED_DECODE, "nvjpeg"))
    np.testing.assert_array_equal(converted, gpu_pixels[..., ::-1])
    ignored = np.asarray(decode(data, MAX_PIXELS, LEGACY_DECODE, "nvjpeg"))  # icc = ignore
    np.testing.assert_array_equal(ignored, gpu_pixels)
    assert len(fake_gpu) == 2


class _ReadMode:
    RGB = "RGB"


def _fake_tensor() -> torch.Tensor:
    return torch.zeros((3, 2, 2), dtype=torch.uint8)


def test_a_decode_of_the_wrong_size_is_the_callers_bad_input(monkeypatch, photo_arrays):
    jpeg = encode(photo_arrays["chelsea"], "JPEG", quality=90)
    # The real function's checks, with the GPU decode replaced by a wrong-sized result.
    monkeypatch.setattr(
        _nvjpeg, "_torchvision", lambda: (torch, _ReadMode, lambda *a, **k: _fake_tensor())
    )
    with pytest.raises(InvalidInput, match=r"nvJPEG decoded the JPEG to \[2, 2, 3\]"):
        decode(jpeg, MAX_PIXELS, LEGACY_DECODE, "nvjpeg")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("nvjpegDecode failed: 7")

    monkeypatch.setattr(_nvjpeg, "_torchvision", lambda: (torch, _ReadMode, broken))
    with pytest.raises(InvalidInput, match="nvJPEG could not decode the JPEG image"):
        decode(jpeg, MAX_PIXELS, LEGACY_DECODE, "nvjpeg")


def test_decode_refuses_a_decoder_name_no_manifest_could_carry(photo_arrays):
    jpeg = encode(photo_arrays["chelsea"], "JPEG", quality=90)
    with pytest.raises(ValueError, match="decoder 'nvJPEG' is not one of"):
        decode(jpeg, MAX_PIXELS, LEGACY_DECODE, "nvJPEG")  # never a silent Pillow decode
