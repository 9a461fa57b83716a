"""Decoding untrusted image bytes to 8-bit RGB exactly as a manifest's `[decode]` table says.

Every choice a decoder makes silently is a field here: which formats, EXIF orientation, embedded
ICC profiles, what is under transparent pixels, how greyscale, palette and CMYK become RGB, what
happens to 16-bit samples and to files with several frames. Each changes pixels as much as a
wrong mean/std, so each is pinned per model version (and hashed into its fingerprint).

`LEGACY` is what the server did before the table existed (the built-in versions declare it, and
a manifest without a `[decode]` table gets it, so their fingerprints stay as they were);
`RECOMMENDED` is what the manifest writers put in new manifests: what a user embedding phone
photos expects (upright, colour-managed, transparent areas on white, GIFs and 16-bit PNGs read).

Which library turns JPEG data into pixels is `[preprocess] decoder`: `pillow` (libjpeg-turbo, on
the CPU) or `nvjpeg` (on the GPU, see `_nvjpeg`); everything else here is the same for both.

Every failure of the decoder on untrusted bytes is the caller's bad input, never a server error.
The pixel count is checked from the header before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from .._errors import InvalidInput, LimitExceeded, ManifestError
from . import _nvjpeg

DECODERS = ("pillow", "nvjpeg")  # [preprocess] decoder
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
EXIF_POLICIES = ("apply", "ignore")
ICC_POLICIES = ("convert_to_srgb", "ignore")
ALPHA_POLICIES = ("composite", "drop")
GRAYSCALE_RULES = ("replicate",)  # L -> R = G = B = L
PALETTE_RULES = ("expand",)  # each index -> its palette colour
CMYK_RULES = ("naive",)  # R = round((255 - C) * (255 - K) / 255), likewise G (M), B (Y)
SIXTEEN_BIT_RULES = ("high_byte", "rgb_only")
FRAME_RULES = ("first", "refuse")
EXIF_ORIENTATION_TAG = 0x0112
# Modes Pillow converts to 8-bit RGB faithfully.
EIGHT_BIT_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# EXIF orientation -> the transpose that makes the image upright.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow raises a wide variety of exceptions on corrupt data; all mean "bad image".
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    RuntimeError,
    ImageCms.PyCMSError,
)


@dataclass(frozen=True)
class DecodeSpec:
    """How encoded bytes become the 8-bit RGB image that preprocessing starts from."""

    formats: tuple[str, ...]
    exif: str  # apply: turn upright as the orientation tag says; ignore: the stored pixels
    icc: str  # convert_to_srgb: through the embedded profile (perceptual intent); ignore
    alpha: str  # composite: over `background`; drop: the colour channels as stored
    background: tuple[int, int, int]  # composite only (still stated, and hashed, with drop)
    grayscale: str
    palette: str
    cmyk: str
    sixteen_bit: str  # high_byte: every 16-bit image reduced to x >> 8 (as the PNG decoder
    # reduces 16-bit RGB itself); rgb_only: 16-bit greyscale refused, 16-bit RGB as decoded
    frames: str  # first: the first frame of a multi-frame file; refuse


LEGACY = DecodeSpec(
    formats=("JPEG", "PNG", "WEBP", "BMP", "TIFF"),
    exif="ignore",
    icc="ignore",
    alpha="drop",
    background=(255, 255, 255),
    grayscale="replicate",
    palette="expand",
    cmyk="naive",
    sixteen_bit="rgb_only",
    frames="first",
)
RECOMMENDED = replace(
    LEGACY,
    formats=FORMATS,
    exif="apply",
    icc="convert_to_srgb",
    alpha="composite",
    sixteen_bit="high_byte",
)


def decode_table(spec: DecodeSpec) -> dict[str, Any]:
    """`spec` as a manifest's [decode] table (every key: for the manifest writers, and the
    fields of DescribeModel's `Decoding`)."""
    return {
        "formats": list(spec.formats),
        "exif": spec.exif,
        "icc": spec.icc,
        "alpha": spec.alpha,
        "background": list(spec.background),
        "grayscale": spec.grayscale,
        "palette": spec.palette,
        "cmyk": spec.cmyk,
        "sixteen_bit": spec.sixteen_bit,
        "frames": spec.frames,
    }


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise LimitExceeded(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(downscale it before sending)"
        )


def open_image(data: bytes, spec: DecodeSpec, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image, its header checked against the limits and the spec."""
    if not data:
        raise InvalidInput("image bytes are empty")
    try:
        image = Image.open(io.BytesIO(data), formats=spec.formats)
    except UnidentifiedImageError:
        raise InvalidInput(
            f"could not identify the image; this model reads {', '.join(spec.formats)} bytes, "
            "or a raw uint8 [height, width, 3] array"
        ) from None
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(f"image refused as a decompression bomb: {exc}") from None
    except DECODE_ERRORS as exc:
        raise InvalidInput(f"could not read the image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an empty side: {width}x{height}")
    check_pixels(width, height, max_pixels)
    frames = int(getattr(image, "n_frames", 1))
    if spec.frames == "refuse" and frames > 1:
        raise InvalidInput(
            f"the {image.format} file has {frames} frames; this model's decode contract "
            "refuses multi-frame files (send one frame)"
        )
    modes = EIGHT_BIT_MODES | (SIXTEEN_BIT_MODES if spec.sixteen_bit == "high_byte" else set())
    if image.mode not in modes:
        accepted = "8-bit RGB, greyscale or palette images"
        if spec.sixteen_bit == "high_byte":
            accepted += ", or 16-bit greyscale"
        raise InvalidInput(f"image mode {image.mode!r} is not supported; send {accepted}")
    return image


def orientation(data: bytes) -> int:
    """The EXIF orientation tag of encoded bytes (1, upright, when absent or unreadable)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (UnidentifiedImageError, Image.DecompressionBombError, *DECODE_ERRORS):
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def require_decoder(decoder: str, ref: str) -> None:
    """Raises FailedPrecondition when `decoder` cannot run here (nvjpeg without CUDA): the model
    `ref` pinning it must not load, rather than decode with another library."""
    if decoder not in DECODERS:
        raise ManifestError(f"{ref}: decoder {decoder!r} is not one of {list(DECODERS)}")
    if decoder == "nvjpeg":
        _nvjpeg.require(ref)


def decode_bytes(
    data: bytes, spec: DecodeSpec, max_pixels: int, decoder: str = "pillow"
) -> Image.Image:
    """Decoded 8-bit RGB image; raises InvalidInput/LimitExceeded for anything else."""
    if decoder not in DECODERS:  # a bug: manifests are validated, so never the caller's input
        raise ValueError(f"decoder {decoder!r} is not one of {list(DECODERS)}")
    image = open_image(data, spec, max_pixels)
    kind = image.format
    turn = _upright(image) if spec.exif == "apply" else None
    if decoder == "nvjpeg" and kind == "JPEG" and image.mode in _nvjpeg.NVJPEG_MODES:
        # The header read above stays Pillow's; the pixels are nvJPEG's, and go through the
        # same profile and orientation steps below (JPEGs have no alpha).
        info = image.info
        image = Image.fromarray(_nvjpeg.decode_rgb(data, *image.size))
        image.info.update(info)
    try:
        image.load()
        if image.mode == "RGB" and spec.icc == "ignore" and turn is None:
            return image  # the common case: nothing to convert
        profile = image.info.get("icc_profile") if spec.icc == "convert_to_srgb" else None
        if image.mode in SIXTEEN_BIT_MODES:
            high = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            image = Image.fromarray(high, "L")
        if profile:
            image = _to_srgb(image, profile)
        if spec.alpha == "composite" and _has_alpha(image):
            backdrop = Image.new("RGBA", image.size, (*spec.background, 255))
            image = Image.alpha_composite(backdrop, image.convert("RGBA"))
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if turn is not None:
            rgb = rgb.transpose(turn)
        return rgb
    except DECODE_ERRORS as exc:
        raise InvalidInput(f"could not decode the {kind} image: {exc}") from None


def _upright(image: Image.Image) -> Image.Transpose | None:
    """The transpose that the orientation tag asks for; none when absent or unreadable (an
    EXIF block too damaged to read is treated as no tag, as viewers do)."""
    try:
        return UPRIGHT.get(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except DECODE_ERRORS:
        return None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    """Through the embedded profile to sRGB (alpha kept, for the alpha policy to handle)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except (ImageCms.PyCMSError, OSError) as exc:
        raise InvalidInput(f"the embedded ICC profile is unreadable: {exc}") from None
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    mode = {"RGBA": "RGB", "LA": "L", "P": "RGB", "PA": "RGB"}.get(image.mode, image.mode)
    if image.mode != mode:
        image = image.convert(mode)
    converted = ImageCms.profileToProfile(
        image, source, _SRGB, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
    )
    assert converted is not None  # inPlace=False returns the new image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted
