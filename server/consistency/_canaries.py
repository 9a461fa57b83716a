"""Canary images: a fixed set of inputs whose embeddings define a model version in practice.

Three real photos are read as the very files scikit-image ships (two PNGs and a JPEG), so they
go through the same decoders as requests (a libjpeg-turbo or Pillow change shows up). Four
synthetic images are made with integer arithmetic only (SHA-256 counter-mode bytes, integer
patterns): no float library call or RNG algorithm whose output could change between versions or
CPUs, so their pixels are bit-stable forever (`tests/test_consistency.py` pins their hashes).
They are sent as raw arrays, the other input path. Each targets a drift source:

- `zoneplate`: rings whose frequency rises to the edges (antialiasing on or off, filter kind,
  resampling weights);
- `blocks`: saturated primaries and a ramp (RGB/BGR order, mean/std per channel, clipping);
- `portrait`: a tall blocky image (short-side geometry, crop centring, aspect handling);
- `tiny`: 40 x 48 pixels of noise (the upscaling path, every pixel independent).

Sizes are odd on purpose, so that off-by-one crop offsets change the result.

Text models have canary sentences instead (`TEXT_CANARIES`): fixed strings of different lengths,
mixed case (lower-casing), accents and non-Latin scripts (normalisation, accent stripping,
unknown pieces), and one far beyond 256 word pieces (truncation length and side). The set is
versioned (`CANARY_SET_VERSION`); golden records name each canary and its input hash, so a
changed canary is reported as such, never as model drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from ..models import ImageSource, RawImage, TextInput
from ..serving import input_digest

CANARY_SET_VERSION = 1
PHOTO_FILES = ("chelsea.png", "rocket.jpg", "coffee.png")  # in scikit-image's `skimage.data`


@dataclass(frozen=True)
class Canary:
    id: str  # "photo/chelsea", "synthetic/noise"
    source: ImageSource | TextInput  # encoded bytes (photos), a raw RGB array, or a text

    @property
    def kind(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def source_sha256(self) -> str:
        """The input's hash exactly as a request would be hashed (the cache key's digest)."""
        return input_digest(self.source).hex()


def seeded_bytes(label: str, count: int) -> np.ndarray:
    """`count` pseudo-random bytes from SHA-256 in counter mode: stable on every platform."""
    blocks = (count + 31) // 32
    stream = b"".join(
        hashlib.sha256(f"embedwarden-canary/{label}/{i}".encode()).digest() for i in range(blocks)
    )
    return np.frombuffer(stream[:count], dtype=np.uint8).copy()


def _raw(array: np.ndarray) -> RawImage:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return RawImage(array.tobytes(), tuple(array.shape), "uint8")


def _noise(height: int, width: int, label: str) -> np.ndarray:
    return seeded_bytes(label, height * width * 3).reshape(height, width, 3)


def _zoneplate(height: int, width: int) -> np.ndarray:
    """Triangle-wave rings, r^2-chirped: frequency rises towards the corners (aliasing)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r2 = (2 * y - height) ** 2 + (2 * x - width) ** 2  # 4 * squared distance from the centre
    out = np.empty((height, width, 3), dtype=np.uint8)
    for c, period in enumerate((7200, 10400, 14800)):
        t = (r2 * 512 // period) % 512
        out[..., c] = np.where(t < 256, t, 511 - t)
    return out


def _blocks(height: int, width: int) -> np.ndarray:
    """Primaries, secondaries, black and white in a 4 x 2 grid, then ramps per channel."""
    colours = np.array(
        [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 255],
            [0, 255, 255],
            [255, 0, 255],
            [255, 255, 0],
            [0, 0, 0],
        ],
        dtype=np.int64,
    )
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    top = height * 2 // 3
    cell = (y * 2 // top) * 4 + (x * 4 // width)
    out: np.ndarray = colours[np.clip(cell, 0, 7)]
    ramp = x * 255 // max(width - 1, 1)
    bottom = y >= top
    out[bottom] = np.stack([ramp, 255 - ramp, (ramp * 3) % 256], axis=-1)[bottom]
    return out.astype(np.uint8)


def _portrait(height: int, width: int) -> np.ndarray:
    """Seeded 8 x 8-pixel blocks of colour: sharp edges at known places."""
    small = _noise((height + 7) // 8, (width + 7) // 8, "portrait")
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:height, :width]


_LONG = " ".join(
    f"Paragraph {i}: the committee reviewed clause {i * 7 % 31} and deferred it again."
    for i in range(40)
)  # about 700 word pieces: truncated at max_length, so its tail must never matter
TEXT_CANARIES = (
    ("text/short", "A man is eating food."),
    ("text/unicode", "Crème brûlée à São Paulo — Zürich, 東京 и Москва: naïve café ☕ 🚀"),
    ("text/cased", "THE QUICK Brown Fox JUMPS over the lazy DOG, twice; then it rests."),
    (
        "text/medium",
        (
            "Embedding services cache vectors by input and model version, so that a changed "
            "tokenizer, a new runtime or a quantised export can never serve stale results."
        ),
    ),
    ("text/long", _LONG),
    ("text/word", "hello"),
)


@cache
def canaries(modality: str = "image") -> tuple[Canary, ...]:
    """The canary set of a modality. Images: photos and synthetic images interleaved (the first
    two are kept as full tensors in golden records: one photo and one synthetic image)."""
    if modality == "text":
        return tuple(Canary(cid, TextInput.of(text)) for cid, text in TEXT_CANARIES)
    data = resources.files("skimage.data")
    photos = [
        Canary(f"photo/{name.rsplit('.', 1)[0]}", (data / name).read_bytes())
        for name in PHOTO_FILES
    ]
    synthetic = [
        Canary("synthetic/zoneplate", _raw(_zoneplate(301, 403))),
        Canary("synthetic/blocks", _raw(_blocks(193, 257))),
        Canary("synthetic/portrait", _raw(_portrait(421, 179))),
        Canary("synthetic/tiny", _raw(_noise(40, 48, "tiny"))),
    ]
    ordered: list[Canary] = []
    for i in range(max(len(photos), len(synthetic))):
        ordered.extend(group[i] for group in (photos, synthetic) if i < len(group))
    return tuple(ordered)


def text_filler(index: int) -> TextInput:
    """Non-canary texts for the batch check of text models: shorter and longer than the
    canaries, so that padding to the longest would change every canary's shape."""
    words = 1 + (index * 37) % 300
    return TextInput.of(" ".join(f"filler{index}-{k % 13}" for k in range(words)))


def filler(index: int, size: int) -> RawImage:
    """Non-canary images that fill the batch of the batch-invariance check (seeded noise of
    varying sizes around the model's input size)."""
    side = size + 17 * (index % 5)
    return _raw(_noise(side, side + 11 * (index % 3), f"filler-{index}"))
