"""Writes manifests for `keras.applications` models (`embedwarden manifest keras ...`).

The normalisation is not looked up in a table: the application module's own `preprocess_input`
is run on every 8-bit level of every channel and must equal, bit for bit, one of the forms a
manifest can pin (which is what our preprocessing then computes):
- `caffe`: RGB -> BGR, minus the ImageNet BGR mean, no scaling (VGG, ResNet v1);
- `tf`: x / 127.5 - 1 (MobileNet/V2, Inception, Xception, NASNet, ResNet v2);
- `torch`: x / 255, then ImageNet mean/std (DenseNet);
- built into the model, raw 0-255 input (EfficientNet/V2, MobileNetV3, ConvNeXt); with
  `include_preprocessing = false` those take x / 127.5 - 1 instead (Keras documents so).
Geometry is not something Keras pins (its examples squash with nearest-neighbour `load_img`); the
default written here is the usual ImageNet evaluation (short side to size * 256/224, centre
crop, bilinear with antialiasing): change it to what your weights were evaluated with.

Layers: the last layer at each spatial resolution (stage outputs, padding layers skipped), the
pooled vector before the classifier (default layer) and the classifier output. The classifier
is built with `classifier_activation = "linear"` unless given: it serves logits, not softmax.
Nothing is downloaded; the weights file must be on disk and is loaded once to prove it fits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from .._errors import InvalidInput
from ..models import (
    RECOMMENDED_DECODE,
    Preprocessor,
    PreprocessSpec,
    decode_table,
    keras_models_dir,
    parse_manifest,
    sha256_file,
)
from ._keras import WEIGHT_SUFFIXES, application, build_application

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# name -> (color_order, divisor, mean, std), each in the colour order given.
NORMALISATIONS: dict[str, tuple[str, float, tuple[float, ...], tuple[float, ...]]] = {
    "caffe": ("BGR", 1.0, CAFFE_MEAN_BGR, (1.0, 1.0, 1.0)),
    "tf": ("RGB", 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    "torch": ("RGB", 255.0, IMAGENET_MEAN, IMAGENET_STD),
    "built-in": ("RGB", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
# Default input sizes that are not 224 (keras.applications' own defaults).
DEFAULT_SIZES = {
    "InceptionV3": 299,
    "InceptionResNetV2": 299,
    "Xception": 299,
    "NASNetLarge": 331,
    "EfficientNetB1": 240,
    "EfficientNetB2": 260,
    "EfficientNetB3": 300,
    "EfficientNetB4": 380,
    "EfficientNetB5": 456,
    "EfficientNetB6": 528,
    "EfficientNetB7": 600,
    "EfficientNetV2B1": 240,
    "EfficientNetV2B2": 260,
    "EfficientNetV2B3": 300,
    "EfficientNetV2S": 384,
    "EfficientNetV2M": 480,
    "EfficientNetV2L": 480,
}
SKIPPED_LAYER_TYPES = ("InputLayer", "ZeroPadding2D")


def _spec(mode: str, size: int = 224) -> PreprocessSpec:
    order, divisor, mean, std = NORMALISATIONS[mode]
    return PreprocessSpec(
        decoder="pillow",
        color_order=order,
        resize_mode="resize",
        size=size,
        interpolation="bilinear",
        antialias=True,
        divisor=divisor,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        layout="NHWC",
    )


def normalisation_mode(name: str, options: dict[str, Any] | None = None) -> str:
    """Which normalisation `keras.applications.<name>` expects, measured bit for bit."""
    if (options or {}).get("include_preprocessing") is False:
        return "tf"
    module = sys.modules[application(name).__module__]
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # [256, 1, 3]
    # preprocess_input works in place on float arrays: hand it a copy it may overwrite.
    theirs = np.asarray(module.preprocess_input(levels.astype(np.float32)[None].copy()))[0]
    for mode in NORMALISATIONS:
        ours = Preprocessor(_spec(mode)).to_tensor(levels)
        if ours.shape == theirs.shape and np.array_equal(ours, theirs.astype(np.float32)):
            return mode
    raise InvalidInput(
        f"keras.applications.{name}: its preprocess_input matches none of "
        f"{list(NORMALISATIONS)}; write the manifest's [preprocess] by hand"
    )


def _catalogue(model: Any) -> tuple[list[dict[str, Any]], str]:
    """Layer entries (stage outputs, pooled vector, classifier) and the default layer."""
    layers = model.layers
    last_at: dict[tuple[int, int], int] = {}
    for i, layer in enumerate(layers):
        shape = tuple(layer.output.shape)
        if type(layer).__name__ in SKIPPED_LAYER_TYPES or len(shape) != 4:
            continue
        last_at[(int(shape[1]), int(shape[2]))] = i
    picked = sorted(last_at.values())
    head = layers[-1]
    vectors = [
        i for i, layer in enumerate(layers[:-1]) if len(layer.output.shape) == 2 and i > picked[-1]
    ]
    if vectors:
        picked.append(vectors[-1])
    if len(head.output.shape) == 2 and len(layers) - 1 not in picked:
        picked.append(len(layers) - 1)
    entries: list[dict[str, Any]] = []
    for i in picked:
        layer = layers[i]
        name = layer.name.lower()
        if i == len(layers) - 1 and type(layer).__name__ == "Dense":
            linear = layer.get_config().get("activation") == "linear"
            name = "logits" if linear else name
        entries.append(
            {"name": name, "node": layer.name, "shape": [int(d) for d in layer.output.shape[1:]]}
        )
    default = entries[picked.index(vectors[-1])]["name"] if vectors else entries[-1]["name"]
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise InvalidInput(f"layer names collide once lower-cased: {names}")
    return entries, default


def keras_manifest(
    app: str,
    weights_file: Path,
    *,
    name: str | None = None,
    version: str = "1",
    size: int | None = None,
    num_classes: int = 1000,
    options: dict[str, Any] | None = None,
    resize_size: int | None = None,
    interpolation: str = "bilinear",
) -> str:
    """TOML text of a manifest for `keras.applications.<app>` with the given weights file.

    `weights_file` is a path, or a bare file name looked up in the Keras cache
    (`$KERAS_HOME/models`); a path outside that cache is written into the manifest."""
    path = Path(weights_file)
    if not path.is_file() and path.name == str(weights_file):
        path = keras_models_dir() / path.name
    if not path.is_file():
        raise InvalidInput(f"weights file {weights_file} not found (nor in {keras_models_dir()})")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise InvalidInput(f"{path.name}: Keras weights end with one of {list(WEIGHT_SUFFIXES)}")
    size = size or DEFAULT_SIZES.get(app, 224)
    opts = dict(options or {})
    if opts.get("include_top", True):
        opts.setdefault("classifier_activation", "linear")
    mode = normalisation_mode(app, opts)
    model = build_application(app, size, num_classes, opts)
    try:
        model.load_weights(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise InvalidInput(f"{path.name} does not fit keras:{app}: {exc}") from None
    layers, default_layer = _catalogue(model)
    order, divisor, mean, std = NORMALISATIONS[mode]
    weights: dict[str, Any] = {
        "file": path.name,
        "sha256": sha256_file(path),
        "format": "keras_weights",
    }
    if path.resolve().parent != keras_models_dir().resolve():
        weights["path"] = str(path.resolve().parent)
    data: dict[str, Any] = {
        "schema": 1,
        "name": name or app.lower(),
        "version": version,
        "description": f"keras.applications {app} ({mode} normalisation)",
        "source": f"keras.applications.{app}, Keras {_keras_version()}",
        "default_layer": default_layer,
        "architecture": {
            "framework": "keras",
            "builder": f"keras:{app}",
            "num_classes": num_classes,
            "options": opts,
        },
        "weights": weights,
        "preprocess": {
            "decoder": "pillow",
            "color_order": order,
            "resize_mode": "resize_crop",
            "resize_size": resize_size or round(size * 256 / 224),
            "size": size,
            "interpolation": interpolation,
            "antialias": True,
            "divisor": divisor,
            "mean": list(mean),
            "std": list(std),
            "layout": "NHWC",
        },
        # Every decode field stated: the recommended contract (upright, colour-managed...).
        "decode": decode_table(RECOMMENDED_DECODE),
        "numerics": {"dtype": "float32", "deterministic": True},
        "layers": layers,
    }
    text = tomli_w.dumps(data)
    parse_manifest(text, origin=f"generated:keras:{app}")  # what we write must parse
    return text


def _keras_version() -> str:
    import keras

    return str(keras.__version__)
