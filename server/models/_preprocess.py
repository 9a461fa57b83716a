"""Decoding and preprocessing exactly as a manifest pins them, framework-independent.

Decoding accepts JPEG, PNG, WebP, BMP and TIFF through Pillow, or raw uint8 H x W x 3 RGB arrays.
Every failure of the decoder on untrusted bytes is the caller's bad input, never a server error.
The pixel count is checked from the header before any pixel is decoded (decompression bombs).

Geometry follows the reference pipelines step for step:
- `crop_resize` (official EfficientNet eval): crop int(fraction * short side) at offset
  ((H - c + 1) // 2, (W - c + 1) // 2), then resize to size x size.
- `resize_crop` (torchvision `ImageClassification`): resize the short side to `resize_size` (long
  side int(resize_size * long / short)), then centre-crop with round((H - size) / 2).
- `resize`: squash to size x size (Keras' default).
Normalisation ((x / divisor - mean) / std in float32) goes through a per-channel lookup table that
is computed with the very same float32 operations, so results are bit-identical to the reference
arithmetic and cost one gather per pixel.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .._errors import InvalidInput, LimitExceeded
from ._manifest import PreprocessSpec

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# The pillow decoder serves the pixels as stored: an EXIF orientation tag is not applied.
EXIF_POLICY = "ignore"
EXIF_ORIENTATION_TAG = 0x0112
# Modes Pillow converts to 8-bit RGB faithfully. Alpha is dropped (not composited).
CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
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
)


@dataclass(frozen=True)
class RawImage:
    """A raw uint8 H x W x 3 RGB array, as sent."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str

    def to_array(self, max_pixels: int) -> np.ndarray:
        if self.dtype != "uint8":
            raise InvalidInput(f"raw image dtype must be uint8, got {self.dtype}")
        if len(self.shape) != 3 or self.shape[2] != 3:
            raise InvalidInput(
                f"raw image shape must be [height, width, 3] (RGB), got {list(self.shape)}"
            )
        height, width, _ = self.shape
        if height <= 0 or width <= 0:
            raise InvalidInput(f"raw image has an empty side: {list(self.shape)}")
        check_pixels(width, height, max_pixels)
        if len(self.data) != height * width * 3:
            raise InvalidInput(
                f"raw image data has {len(self.data)} bytes; shape {list(self.shape)} needs "
                f"{height * width * 3}"
            )
        return np.frombuffer(self.data, dtype=np.uint8).reshape(height, width, 3)


ImageSource = bytes | RawImage


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise LimitExceeded(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(downscale it before sending)"
        )


def exif_orientation(source: ImageSource) -> int:
    """The EXIF orientation tag of encoded bytes (1, upright, when absent or unreadable)."""
    if isinstance(source, RawImage) or not source:
        return 1
    try:
        with Image.open(io.BytesIO(source), formats=ACCEPTED_FORMATS) as image:
            value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (UnidentifiedImageError, Image.DecompressionBombError, *DECODE_ERRORS):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode(source: ImageSource, max_pixels: int, apply_exif: bool = False) -> Image.Image:
    """Decoded 8-bit RGB image; raises InvalidInput/LimitExceeded for anything else.

    `apply_exif` rotates/flips as the EXIF orientation tag says (not the served policy, see
    EXIF_POLICY; the verification catalogue uses it)."""
    image = _decode(source, max_pixels)
    if apply_exif and not isinstance(source, RawImage):
        try:
            image = ImageOps.exif_transpose(image)
        except DECODE_ERRORS as exc:
            raise InvalidInput(f"could not apply the EXIF orientation: {exc}") from None
    return image


def _decode(source: ImageSource, max_pixels: int) -> Image.Image:
    if isinstance(source, RawImage):
        return Image.fromarray(source.to_array(max_pixels))
    if not source:
        raise InvalidInput("image bytes are empty")
    try:
        image = Image.open(io.BytesIO(source), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(
            "could not identify the image; send JPEG, PNG, WebP, BMP or TIFF bytes, or a raw "
            "uint8 [height, width, 3] array"
        ) from None
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(f"image refused as a decompression bomb: {exc}") from None
    except DECODE_ERRORS as exc:
        raise InvalidInput(f"could not read the image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an empty side: {width}x{height}")
    check_pixels(width, height, max_pixels)
    if image.mode not in CONVERTIBLE_MODES:
        raise InvalidInput(
            f"image mode {image.mode!r} (e.g. 16-bit or float) is not supported; send 8-bit "
            "RGB, grayscale or palette images"
        )
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except DECODE_ERRORS as exc:
        raise InvalidInput(f"could not decode the {image.format} image: {exc}") from None


Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class GeometryPlan:
    """The crop and resize steps for one image size, in order; None skips a step."""

    crop: Box | None
    resize: tuple[int, int] | None  # (width, height)
    crop_after: Box | None


def plan_geometry(spec: PreprocessSpec, width: int, height: int) -> GeometryPlan:
    """The geometry steps `spec` prescribes for a width x height image."""
    if spec.resize_mode == "crop_resize":
        crop = max(1, int(spec.crop_fraction * min(width, height)))
        top = (height - crop + 1) // 2
        left = (width - crop + 1) // 2
        return GeometryPlan((left, top, left + crop, top + crop), (spec.size, spec.size), None)
    if spec.resize_mode == "resize_crop":
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if new_w < spec.size or new_h < spec.size:
            raise InvalidInput(f"image {width}x{height} is too small to crop {spec.size}")
        top = round((new_h - spec.size) / 2.0)
        left = round((new_w - spec.size) / 2.0)
        resize = None if (new_w, new_h) == (width, height) else (new_w, new_h)
        return GeometryPlan(None, resize, (left, top, left + spec.size, top + spec.size))
    return GeometryPlan(None, (spec.size, spec.size), None)


class Preprocessor:
    """Applies one manifest's PreprocessSpec to decoded images."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.resample = RESAMPLE[spec.interpolation]

    @cached_property
    def _lut(self) -> np.ndarray:
        """float32 value of each (channel, uint8 level), with the reference's exact operations."""
        levels = np.arange(256, dtype=np.float32)
        divisor = np.float32(self.spec.divisor)
        rows = []
        for mean, std in zip(self.spec.mean, self.spec.std, strict=True):
            scaled = levels / divisor if self.spec.divisor != 1.0 else levels
            rows.append((scaled - np.float32(mean)) / np.float32(std))
        return np.stack(rows).astype(np.float32)

    def geometry(self, image: Image.Image) -> Image.Image:
        """Crop and resize to the model's input size."""
        plan = plan_geometry(self.spec, *image.size)
        if plan.crop is not None:
            image = image.crop(plan.crop)
        if plan.resize is not None:
            image = image.resize(plan.resize, self.resample)
        if plan.crop_after is not None:
            image = image.crop(plan.crop_after)
        return image

    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HWC RGB -> normalised float32 in the manifest's colour order and layout.

        Float pixels (0-255 scale, e.g. from a resize that does not round) take the same
        float32 arithmetic without the lookup table."""
        if self.spec.color_order == "BGR":
            pixels = pixels[..., ::-1]
        if pixels.dtype != np.uint8:
            return self._normalise(pixels.astype(np.float32))
        lut = self._lut
        if self.spec.layout == "NCHW":
            out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
            for c in range(3):
                np.take(lut[c], pixels[..., c], out=out[c])
            return out
        out = np.empty((*pixels.shape[:2], 3), dtype=np.float32)
        for c in range(3):
            out[..., c] = np.take(lut[c], pixels[..., c])
        return out

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        spec = self.spec
        scaled = pixels / np.float32(spec.divisor) if spec.divisor != 1.0 else pixels
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        out = ((scaled - mean) / std).astype(np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1) if spec.layout == "NCHW" else out)

    def __call__(self, image: Image.Image) -> np.ndarray:
        resized = self.geometry(image)
        return self.to_tensor(np.asarray(resized, dtype=np.uint8))

    def prepare(self, source: ImageSource, max_pixels: int) -> np.ndarray:
        """Decode and preprocess one input."""
        return self(decode(source, max_pixels))


def tensor_sha256(tensor: np.ndarray) -> str:
    """Hash of a preprocessed tensor (dtype, shape and bytes), for the preprocessing check."""
    digest = hashlib.sha256(f"{tensor.dtype.str}{tensor.shape}".encode())
    digest.update(np.ascontiguousarray(tensor).tobytes())
    return digest.hexdigest()
