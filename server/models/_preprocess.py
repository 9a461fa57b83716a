"""Decoding and preprocessing exactly as a manifest pins them, framework-independent.

Inputs are encoded bytes, decoded by the manifest's `decoder` as its `[decode]` table says (see
`_decode`), or raw uint8 H x W x 3 RGB arrays, used as sent.

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
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from .._errors import InvalidInput
from ._decode import LEGACY, DecodeSpec, check_pixels, decode_bytes, orientation
from ._manifest import PreprocessSpec
from ._text import TextInput

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


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


def exif_orientation(source: ImageSource) -> int:
    """The EXIF orientation tag of encoded bytes (1, upright, when absent or unreadable)."""
    return 1 if isinstance(source, RawImage) or not source else orientation(source)


def decode(
    source: ImageSource, max_pixels: int, spec: DecodeSpec = LEGACY, decoder: str = "pillow"
) -> Image.Image:
    """Decoded 8-bit RGB image; raises InvalidInput/LimitExceeded for anything else.
    `decoder` is the manifest's `[preprocess] decoder` (raw arrays need none)."""
    if isinstance(source, RawImage):
        return Image.fromarray(source.to_array(max_pixels))
    return decode_bytes(source, spec, max_pixels, decoder)


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

    def prepare(self, source: ImageSource | TextInput, max_pixels: int) -> np.ndarray:
        """Decode and preprocess one input."""
        if isinstance(source, TextInput):
            raise InvalidInput("this is an image model: send `encoded` or `raw` images, not text")
        return self(decode(source, max_pixels, *self.spec.decoding))


def tensor_sha256(tensor: np.ndarray) -> str:
    """Hash of a preprocessed tensor (dtype, shape and bytes), for the preprocessing check."""
    digest = hashlib.sha256(f"{tensor.dtype.str}{tensor.shape}".encode())
    digest.update(np.ascontiguousarray(tensor).tobytes())
    return digest.hexdigest()
