"""The Keras EfficientNet-Lite0 is a faithful port of the torch default, from the same weights:
strict conversion, same preprocessing and catalogue, the same classes first on real photos, and
per-layer differences at float-rounding level."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import CAT_CLASSES, ESPRESSO, assert_close
from PIL import Image

from embedwarden.server import ManifestError, build_registry
from embedwarden.server._frameworks import import_tensorflow
from embedwarden.server.backbones import load_backbone
from embedwarden.server.consistency import to_channels_last
from embedwarden.server.consistency._checks import cosines
from embedwarden.server.models._preprocess import Preprocessor
from embedwarden.server.models._weights import read_verified

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module")
def keras():
    """Imported when the first test here runs, not at collection (see test_keras_backbone)."""
    import_tensorflow()
    import keras

    return keras


def build_small(keras):
    """The port at input 32: same variables, a quick build."""
    from embedwarden.server.backbones._efficientnet_lite_keras import build_efficientnet_lite0

    return build_efficientnet_lite0(keras, input_size=32)


REGISTRY = build_registry()
TORCH = REGISTRY.resolve("efficientnet_lite0")
KERAS = REGISTRY.resolve("efficientnet_lite0_keras")
# max|d|/max|ref| per layer measured 1.6e-7 (stem) .. 6.0e-6 (features) on AVX-512, 5.8e-6 on
# AVX2 (1.6e-4 absolute on block outputs up to 64); 10x margin. Cosine: 1 - 4.2e-12 at worst on
# both. A wrong layout, padding or BatchNorm setting gives differences of order 1 or more.
MAX_REL = 1e-4
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def state():
    _, data = read_verified(TORCH)
    return torch.load(io.BytesIO(data), weights_only=True)


@pytest.fixture(scope="module")
def models(keras):
    torch_model, _ = load_backbone(TORCH, "cpu")
    keras_model, verified = load_backbone(KERAS, "cpu")
    assert verified.sha256 == TORCH.weights.sha256  # the very same file
    return torch_model, keras_model


@pytest.fixture(scope="module")
def outputs(models, photo_arrays):
    torch_model, keras_model = models
    images = [
        Image.fromarray(photo_arrays[name]) for name in ("chelsea", "coffee", "rocket", "astronaut")
    ]
    x_torch = np.stack([Preprocessor(TORCH.preprocess)(i) for i in images])
    x_keras = np.stack([Preprocessor(KERAS.preprocess)(i) for i in images])
    np.testing.assert_array_equal(x_keras, x_torch.transpose(0, 2, 3, 1))  # same bits, NHWC
    names = [layer.name for layer in TORCH.layers]
    return torch_model.infer(x_torch, names), keras_model.infer(x_keras, names)


def test_manifests_share_weights_preprocessing_and_catalogue():
    assert (KERAS.framework, TORCH.framework) == ("keras", "torch")
    assert KERAS.weights.sha256 == TORCH.weights.sha256 and KERAS.weights.file == TORCH.weights.file
    assert KERAS.preprocess.layout == "NHWC" and TORCH.preprocess.layout == "NCHW"
    assert {**vars(KERAS.preprocess), "layout": ""} == {**vars(TORCH.preprocess), "layout": ""}
    assert [layer.name for layer in KERAS.layers] == [layer.name for layer in TORCH.layers]
    for k, t in zip(KERAS.layers, TORCH.layers, strict=True):
        assert k.node == t.node  # Keras layers carry the torch node names
        if len(t.shape) == 3:
            assert (k.layout, t.layout) == ("HWC", "CHW")
            assert k.shape == (t.shape[1], t.shape[2], t.shape[0])
        else:
            assert k.shape == t.shape
    assert KERAS.fingerprint() != TORCH.fingerprint()


def test_conversion_uses_every_tensor_exactly_once(keras, state):
    from embedwarden.server.backbones._efficientnet_lite_keras import load_torch_state_dict

    model = build_small(keras)
    copied = load_torch_state_dict(model, state)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert copied == len(state) - len(counters) == len(model.weights)


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_conversion_refuses_a_state_dict_that_does_not_fit(keras, state, fault):
    from embedwarden.server.backbones._efficientnet_lite_keras import load_torch_state_dict

    model = build_small(keras)
    broken = dict(state)
    if fault == "missing":
        del broken["_blocks.7._bn1.running_var"]
    elif fault == "extra":
        broken["_blocks.16._bn1.weight"] = torch.ones(3)
    else:
        broken["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(ManifestError, match=r"_blocks\.7\._bn1|_blocks\.16|_fc\.weight"):
        load_torch_state_dict(model, broken)


def test_the_port_ranks_the_same_classes_first_on_real_photos(outputs):
    torch_out, keras_out = outputs
    t, k = torch_out["logits"], keras_out["logits"]
    assert (t.argmax(1) == k.argmax(1)).all()
    for i in range(len(t)):
        assert set(np.argsort(-t[i])[:5]) == set(np.argsort(-k[i])[:5]), i
    assert set(np.argsort(-k[0])[:3].tolist()) <= CAT_CLASSES
    assert int(k[1].argmax()) == ESPRESSO


def test_every_layer_agrees_within_float_rounding(outputs):
    torch_out, keras_out = outputs
    for layer in KERAS.layers:
        t = to_channels_last(torch_out[layer.name], "CHW" if len(layer.shape) == 3 else "C")
        k = keras_out[layer.name]
        assert t.shape == k.shape, layer.name
        assert_close(k, t, rel=MAX_REL, what=layer.name)
        assert cosines(t, k).min() > MIN_COSINE, layer.name


def test_inference_leaves_every_variable_unchanged(models):
    _, keras_model = models
    before = keras_model.state_checksum()
    keras_model.infer(
        np.random.default_rng(1).normal(0, 1, (3, 224, 224, 3)).astype(np.float32), ["logits"]
    )
    assert keras_model.state_checksum() == before and keras_model.training_modules() == []
