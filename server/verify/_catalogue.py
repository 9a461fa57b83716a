"""The catalogue of known pipeline mistakes, each a change to the manifest's preprocessing.

A mistake turns the reference `Recipe` (the manifest's preprocessing exactly) into the recipe a
mistaken pipeline follows; rendering a recipe gives the input tensor that pipeline would feed
the model. The names are part of the contract: clients, the CLI and the tests use them.

Mistakes touch aspects of the pipeline (channel order, value scale, interpolation, antialiasing,
geometry, orientation, memory layout). Two mistakes combine when their aspects are disjoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from PIL import Image

from ..models import (
    ImageSource,
    Preprocessor,
    PreprocessSpec,
    exif_orientation,
    plan_geometry,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on the [0, 1] scale
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Recipe:
    """How one pipeline turns an input into the model's tensor."""

    spec: PreprocessSpec  # its `decode` included
    antialias: bool = True
    transposed: bool = False  # the right tensor's memory read with the other layout's shape


@dataclass(frozen=True)
class Mistake:
    name: str
    summary: str
    aspects: frozenset[str]
    change: Callable[[Recipe], Recipe | None]  # None: not possible for this recipe

    def apply(self, recipe: Recipe) -> Recipe | None:
        changed = self.change(recipe)
        return None if changed is None or changed == recipe else changed


def _spec(recipe: Recipe, **changes: object) -> Recipe:
    return replace(recipe, spec=replace(recipe.spec, **changes))  # type: ignore[arg-type]


def _in_order(rgb: tuple[float, float, float], order: str) -> tuple[float, float, float]:
    return (rgb[2], rgb[1], rgb[0]) if order == "BGR" else rgb


def _bgr(r: Recipe) -> Recipe:
    return _spec(r, color_order="RGB" if r.spec.color_order == "BGR" else "BGR")


def _imagenet(r: Recipe) -> Recipe:
    order = r.spec.color_order
    mean, std = _in_order(IMAGENET_MEAN, order), _in_order(IMAGENET_STD, order)
    return _spec(r, divisor=255.0, mean=mean, std=std)


def _interpolation(method: str) -> Callable[[Recipe], Recipe | None]:
    def change(r: Recipe) -> Recipe | None:
        if r.spec.interpolation == method:
            return None
        return replace(_spec(r, interpolation=method), antialias=r.antialias or method == "nearest")

    return change


def _no_antialias(r: Recipe) -> Recipe | None:
    return None if r.spec.interpolation == "nearest" else replace(r, antialias=False)


def _no_crop(r: Recipe) -> Recipe:
    return _spec(r, resize_mode="resize_crop", resize_size=r.spec.size, crop_fraction=0.0)


def _exif(policy: str) -> Callable[[Recipe], Recipe | None]:
    def change(r: Recipe) -> Recipe | None:
        if r.spec.decode.exif == policy:
            return None
        return _spec(r, decode=replace(r.spec.decode, exif=policy))

    return change


def _layout(from_layout: str) -> Callable[[Recipe], Recipe | None]:
    def change(r: Recipe) -> Recipe | None:
        return replace(r, transposed=True) if r.spec.layout == from_layout else None

    return change


MISTAKES: tuple[Mistake, ...] = (
    Mistake("bgr", "colour channels reversed", frozenset({"channels"}), _bgr),
    Mistake(
        "imagenet_norm",
        "torchvision's ImageNet mean/std instead of the manifest's normalisation",
        frozenset({"scale"}),
        _imagenet,
    ),
    Mistake(
        "unit_scale",
        "pixels scaled to [0, 1], no further normalisation",
        frozenset({"scale"}),
        lambda r: _spec(r, divisor=255.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    ),
    Mistake(
        "tf_scale",
        "x / 127.5 - 1",
        frozenset({"scale"}),
        lambda r: _spec(r, divisor=127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0)),
    ),
    Mistake(
        "caffe",
        "BGR, ImageNet means subtracted, no scaling (Keras preprocess_input 'caffe')",
        frozenset({"channels", "scale"}),
        lambda r: _spec(
            r, color_order="BGR", divisor=1.0, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0)
        ),
    ),
    *(
        Mistake(m, f"{m} interpolation", frozenset({"interpolation"}), _interpolation(m))
        for m in ("bilinear", "bicubic", "nearest")
    ),
    Mistake(
        "no_antialias",
        "downscaled without antialiasing (e.g. torch interpolate(antialias=False))",
        frozenset({"antialias"}),
        _no_antialias,
    ),
    Mistake(
        "squash",
        "resized straight to the input size, aspect ratio not kept",
        frozenset({"geometry"}),
        lambda r: _spec(r, resize_mode="resize"),
    ),
    Mistake(
        "no_crop",
        "short side resized to the input size, then centre crop (crop fraction 1.0)",
        frozenset({"geometry"}),
        _no_crop,
    ),
    Mistake(
        "exif_ignored",
        "EXIF orientation not applied (the manifest applies it)",
        frozenset({"orientation"}),
        _exif("ignore"),
    ),
    Mistake(
        "exif_applied",
        "EXIF orientation applied (the manifest serves the stored pixels)",
        frozenset({"orientation"}),
        _exif("apply"),
    ),
    Mistake(
        "nhwc_as_nchw",
        "a channels-last tensor read as channels-first",
        frozenset({"layout"}),
        _layout("NCHW"),
    ),
    Mistake(
        "nchw_as_nhwc",
        "a channels-first tensor read as channels-last",
        frozenset({"layout"}),
        _layout("NHWC"),
    ),
)
BY_NAME = {m.name: m for m in MISTAKES}
COMBINATION = "+"  # two mistakes together are named "a+b"


def reference(spec: PreprocessSpec) -> Recipe:
    return Recipe(spec)


def applicable(recipe: Recipe, source: ImageSource) -> list[tuple[str, Recipe]]:
    """Every single mistake that changes this input's tensor, with its recipe."""
    oriented = exif_orientation(source) != 1
    out = []
    for mistake in MISTAKES:
        if "orientation" in mistake.aspects and not oriented:
            continue  # no tag, or a raw array: both policies give the same pixels
        changed = mistake.apply(recipe)
        if changed is not None:
            out.append((mistake.name, changed))
    return out


def combine(recipe: Recipe, first: str, second: str) -> Recipe | None:
    """Both mistakes at once, when they touch different aspects and both change something."""
    a, b = BY_NAME[first], BY_NAME[second]
    if a.aspects & b.aspects:
        return None
    once = a.apply(recipe)
    return None if once is None else b.apply(once)


def names() -> list[str]:
    return [m.name for m in MISTAKES]


# --- rendering -----------------------------------------------------------------------------


def render(recipe: Recipe, image: Image.Image) -> np.ndarray:
    """The tensor a pipeline following `recipe` feeds the model for an input that decoded
    (as `recipe.spec.decoding` says) to `image`."""
    preprocessor = _preprocessor(recipe.spec)
    if recipe.antialias:
        tensor = preprocessor(image)
    else:
        tensor = preprocessor.to_tensor(_geometry_without_antialias(image, recipe.spec))
    if recipe.transposed:
        tensor = _read_as_other_layout(tensor, recipe.spec.layout)
    return tensor


@cache
def _preprocessor(spec: PreprocessSpec) -> Preprocessor:
    return Preprocessor(spec)


def _read_as_other_layout(tensor: np.ndarray, layout: str) -> np.ndarray:
    """The right tensor laid out in the other order, then read with this layout's shape."""
    if layout == "NCHW":
        return np.ascontiguousarray(tensor.transpose(1, 2, 0)).reshape(tensor.shape)
    return np.ascontiguousarray(tensor.transpose(2, 0, 1)).reshape(tensor.shape)


def _geometry_without_antialias(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The manifest's geometry with a fixed-support kernel (half-pixel centres, borders
    clamped), as torch's interpolate(antialias=False) computes it; float pixels, not rounded."""
    width, height = image.size
    plan = plan_geometry(spec, width, height)
    pixels = np.asarray(image, dtype=np.float32)
    if plan.crop is not None:
        left, top, right, bottom = plan.crop
        pixels = pixels[top:bottom, left:right]
    if plan.resize is not None:
        new_w, new_h = plan.resize
        rows = _weights(pixels.shape[0], new_h, spec.interpolation)
        cols = _weights(pixels.shape[1], new_w, spec.interpolation)
        pixels = np.einsum("ij,jkc,lk->ilc", rows, pixels, cols, optimize=True)
    if plan.crop_after is not None:
        left, top, right, bottom = plan.crop_after
        pixels = pixels[top:bottom, left:right]
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _weights(size_in: int, size_out: int, interpolation: str) -> np.ndarray:
    """[size_out, size_in] interpolation matrix along one axis."""
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale - 0.5
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    if interpolation == "bilinear":
        centres = np.maximum(centres, 0.0)
        low = np.floor(centres).astype(int)
        frac = centres - low
        for offset, weight in ((0, 1 - frac), (1, frac)):
            np.add.at(matrix, (rows, np.clip(low + offset, 0, size_in - 1)), weight)
        return matrix
    # bicubic and the other smooth kernels: torch's cubic convolution (a = -0.75)
    low = np.floor(centres).astype(int)
    frac = centres - low
    for offset in (-1, 0, 1, 2):
        weight = _cubic(frac - offset)
        np.add.at(matrix, (rows, np.clip(low + offset, 0, size_in - 1)), weight)
    return matrix
