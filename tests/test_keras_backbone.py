"""keras.applications backbones: verified weights from the Keras cache, the model's own
preprocessing bit for bit, intermediate layers in HWC, frozen BatchNorm, no state leaking between
co-loaded models.

The weights are seeded files written by the tests (no network); the loading path is the real one
(`$KERAS_HOME/models`, hashed, Keras' own reader)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import assert_close, run_cli, seeded_keras_weights
from PIL import Image

from embedwarden.server import (
    FailedPrecondition,
    ManifestError,
    WeightsVerificationError,
    parse_manifest,
)
from embedwarden.server._frameworks import import_tensorflow
from embedwarden.server.models import RECOMMENDED_DECODE
from embedwarden.server.models._preprocess import Preprocessor
from embedwarden.server.models._weights import keras_models_dir, read_verified, sha256_file

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module")
def kx() -> SimpleNamespace:
    """The TensorFlow side, imported when the first test here runs, not at collection:
    importing TensorFlow changes the process (versions, flags) for every other test module."""
    tf = import_tensorflow()  # torch first, then TensorFlow, configured once
    import keras

    from embedwarden.server.backbones import _keras, _keras_manifest

    return SimpleNamespace(
        tf=tf,
        keras=keras,
        build_application=_keras.build_application,
        keras_process_settings=_keras.keras_process_settings,
        spec=_keras_manifest._spec,
        keras_manifest=_keras_manifest.keras_manifest,
        normalisation_mode=_keras_manifest.normalisation_mode,
    )


SIZE = 96
OPTIONS = {"alpha": 0.35}
FILE = "mobilenet_v2_0.35_96_seeded.weights.h5"


@pytest.fixture(scope="module")
def keras_home(kx, tmp_path_factory):
    home = tmp_path_factory.mktemp("keras-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("KERAS_HOME", str(home))
    seeded_keras_weights(home / "models" / FILE, "MobileNetV2", size=SIZE, seed=0, **OPTIONS)
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def manifest(kx, keras_home):
    return parse_manifest(kx.keras_manifest("MobileNetV2", FILE, size=SIZE, options=OPTIONS))


def test_the_manifest_command_writes_the_same_manifest(manifest, keras_home, tmp_path):
    out = tmp_path / "mobilenet.toml"
    run_cli(
        "manifest",
        "keras",
        "MobileNetV2",
        FILE,
        "--size",
        str(SIZE),
        "--option",
        "alpha=0.35",
        "--out",
        str(out),
        env={"KERAS_HOME": str(keras_home)},
    )
    written = parse_manifest(out.read_text())
    assert written.fingerprint() == manifest.fingerprint()
    assert written.weights.sha256 == sha256_file(keras_home / "models" / FILE)


def load(manifest, weights_dirs=()):
    from embedwarden.server.backbones._keras import KerasBackbone

    _, data = read_verified(manifest, weights_dirs)
    return KerasBackbone(manifest, data, "cpu")


@pytest.fixture(scope="module")
def backbone(manifest):
    return load(manifest)


@pytest.fixture(scope="module")
def batch(manifest, photo_arrays):
    pre = Preprocessor(manifest.preprocess)
    return np.stack([pre(Image.fromarray(a)) for a in photo_arrays.values()])


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "mode"),
    [
        ("ResNet50", "caffe"),
        ("MobileNetV2", "tf"),
        ("DenseNet121", "torch"),
        ("EfficientNetB0", "built-in"),
        ("MobileNetV3Small", "built-in"),
    ],
)
def test_normalisation_equals_preprocess_input_bit_for_bit(kx, app, mode, photo_arrays):
    assert kx.normalisation_mode(app) == mode
    module = sys.modules[getattr(kx.keras.applications, app).__module__]
    pixels = photo_arrays["astronaut"]
    ours = Preprocessor(kx.spec(mode, size=pixels.shape[0])).to_tensor(pixels)
    given = pixels.astype(np.float32)
    theirs = np.asarray(module.preprocess_input(given))
    np.testing.assert_array_equal(ours, theirs)
    if mode != "built-in":  # the trap the issue names: float input is overwritten in place
        assert not np.array_equal(given, pixels.astype(np.float32))


def test_include_preprocessing_false_means_tf_mode(kx):
    assert kx.normalisation_mode("MobileNetV3Small", {"include_preprocessing": False}) == "tf"


# --- manifest and loading ----------------------------------------------------------------


def test_manifest_pins_file_hash_mode_and_hwc_layers(manifest, keras_home):
    assert manifest.preprocess.decode == RECOMMENDED_DECODE  # every decode field written
    assert manifest.framework == "keras" and manifest.architecture.builder == "keras:MobileNetV2"
    assert manifest.weights.format == "keras_weights" and manifest.weights.path == ""
    assert manifest.weights.file == FILE
    p = manifest.preprocess
    assert (p.layout, p.color_order, p.divisor, p.mean, p.std) == (
        "NHWC",
        "RGB",
        127.5,
        (1.0,) * 3,
        (1.0,) * 3,
    )
    assert manifest.layer("out_relu").shape == (3, 3, 1280)
    assert manifest.layer("out_relu").layout == "HWC"
    assert manifest.layer("logits").shape == (1000,)
    assert manifest.default_layer == "global_average_pooling2d"
    assert manifest.architecture.options["classifier_activation"] == "linear"
    # Found where get_file would have cached it, and hashed.
    verified, _ = read_verified(manifest)
    assert verified.path == keras_models_dir() / FILE == keras_home / "models" / FILE


def test_outputs_equal_a_direct_keras_run_of_the_same_file(kx, backbone, manifest, batch):
    reference = kx.build_application("MobileNetV2", SIZE, 1000, dict(manifest.architecture.options))
    reference.load_weights(str(keras_models_dir() / FILE))
    taps = kx.keras.Model(
        reference.inputs[0],
        [reference.get_layer("block_6_expand_relu").output, reference.output],
    )
    expected_block, expected_logits = (t.numpy() for t in taps(batch, training=False))
    ours = backbone.infer(batch, ["logits", "block_6_expand_relu"])
    # Served through a traced graph: TensorFlow's graph optimiser fuses conv + BatchNorm + ReLU,
    # which rounds differently from the eager op-by-op run: max|d|/max|ref| measured 2.3e-6
    # (AVX-512) .. 2.5e-6 (AVX2) on logits, 1.2e-6 on block 6 (both); 10x margin.
    assert_close(ours["logits"], expected_logits, rel=5e-5, what="logits")
    assert_close(ours["block_6_expand_relu"], expected_block, rel=2e-5, what="block_6")
    assert (ours["logits"].argmax(1) == expected_logits.argmax(1)).all()
    assert ours["block_6_expand_relu"].shape == (4, 12, 12, 96)  # NHWC


def test_every_layer_has_its_catalogued_hwc_shape_and_graphs_are_cached(backbone, manifest, batch):
    names = [layer.name for layer in manifest.layers]
    out = backbone.infer(batch[:2], names)
    for layer in manifest.layers:
        assert out[layer.name].shape == (2, *layer.shape), layer.name
        assert out[layer.name].dtype == np.float32
    runner = backbone._runner(tuple(sorted(names)))
    backbone.infer(batch[:3], list(reversed(names)))  # another batch size, another order
    assert backbone._runner(tuple(sorted(names))) is runner


def test_legacy_h5_files_as_keras_applications_publishes_them_load_too(
    backbone, manifest, batch, tmp_path
):
    """keras.applications' published weights are Keras 2 `.h5` files (what get_file caches)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # the only writer of that format

    legacy = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96.h5"
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone.model)
    text = (
        manifest.text.replace(FILE, legacy.name)
        .replace(manifest.weights.sha256, sha256_file(legacy))
        .replace('format = "keras_weights"', f'format = "keras_weights"\npath = "{tmp_path}"')
    )
    other = load(parse_manifest(text))
    assert other.state_checksum() == backbone.state_checksum()
    np.testing.assert_array_equal(
        other.infer(batch, ["logits"])["logits"], backbone.infer(batch, ["logits"])["logits"]
    )


def test_a_changed_file_under_the_same_name_refuses_to_load(manifest, tmp_path):
    other = seeded_keras_weights(tmp_path / FILE, "MobileNetV2", size=SIZE, seed=1, **OPTIONS)
    text = manifest.text.replace(
        'format = "keras_weights"', f'format = "keras_weights"\npath = "{other.parent}"'
    )
    with pytest.raises(WeightsVerificationError, match="refusing to load"):
        read_verified(parse_manifest(text))


# Keras only warns when it skips what it cannot find (the layers keep random values): the
# load must still refuse, by its own check.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_weights_of_another_architecture_refuse_to_load(manifest, tmp_path):
    other = seeded_keras_weights(
        tmp_path / "wider.weights.h5", "MobileNetV2", size=SIZE, seed=0, alpha=0.5
    )
    text = (
        manifest.text.replace(FILE, other.name)
        .replace(manifest.weights.sha256, sha256_file(other))
        .replace('format = "keras_weights"', f'format = "keras_weights"\npath = "{tmp_path}"')
    )
    with pytest.raises(ManifestError, match="does not match architecture"):
        load(parse_manifest(text))


# --- BatchNorm and training mode -------------------------------------------------------------


def _moving_statistics(backbone):
    return {
        f"{layer.name}/{v.name}": v.numpy().copy()
        for layer in backbone.model.layers
        for v in layer.weights
        if v.name in ("moving_mean", "moving_variance")
    }


def test_moving_statistics_are_unchanged_by_inference(backbone, batch):
    before = _moving_statistics(backbone)
    checksum = backbone.state_checksum()
    assert len(before) == 2 * sum(
        type(layer).__name__ == "BatchNormalization" for layer in backbone.model.layers
    )
    rng = np.random.default_rng(0)
    for n in (1, 4):  # batches whose statistics are far from the moving ones
        backbone.infer((rng.standard_normal((n, SIZE, SIZE, 3)) * 3).astype(np.float32), ["logits"])
    backbone.infer(batch, ["logits", "out_relu"])
    after = _moving_statistics(backbone)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert backbone.state_checksum() == checksum
    assert backbone.training_modules() == []


def test_outputs_do_not_depend_on_batch_composition(backbone, batch):
    alone = backbone.infer(batch[:1], ["logits"])["logits"][0]
    together = backbone.infer(batch, ["logits"])["logits"][0]
    # max|d|/max|ref| measured 5.8e-7 .. 1.2e-6 (AVX-512, 2 or 1 threads) .. 3.4e-6 (AVX2) on
    # logits up to ~10 (an absolute 1e-5 failed on a Xeon with 1.34e-5); 10x margin.
    assert_close(alone, together, rel=5e-5, what="logits")


def test_batchnorm_forced_into_training_is_seen(manifest, batch):
    backbone = load(manifest)  # its own instance: the fault moves its statistics
    bn = "block_3_depthwise_BN"
    eval_logits = backbone.infer(batch, ["logits"])["logits"]
    checksum = backbone.state_checksum()
    backbone.set_training(bn, True)
    assert backbone.training_modules() == [bn]
    train_logits = backbone.infer(batch, ["logits"])["logits"]
    assert backbone.state_checksum() != checksum  # moving statistics were updated
    # Batch statistics were used: measured 3.05 on logits up to 11.4, rounding is below 1e-4.
    assert np.abs(train_logits - eval_logits).max() > 1e-3
    backbone.set_training(bn, False)
    assert backbone.training_modules() == []
    mutated = backbone.state_checksum()
    backbone.infer(batch, ["logits"])
    assert backbone.state_checksum() == mutated  # back to frozen inference


# --- co-loading ------------------------------------------------------------------------------


def test_coloaded_models_leak_no_state(kx, backbone, manifest, batch):
    settings = kx.keras_process_settings()
    before = backbone.infer(batch, ["logits", "out_relu"])
    checksum = backbone.state_checksum()
    # Another application, a second instance of the same manifest, and the torch default.
    kx.build_application("MobileNet", 64, 10, {"alpha": 0.25})
    twin = load(manifest)
    from embedwarden.server import build_registry
    from embedwarden.server.backbones import load_backbone

    torch_model, _ = load_backbone(build_registry().resolve("efficientnet_lite0"), "cpu")
    torch_model.infer(np.zeros((1, 3, 224, 224), np.float32), ["logits"])
    after = backbone.infer(batch, ["logits", "out_relu"])
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    # Auto-named layers got the names of a fresh process, not `..._1`.
    assert [layer.name for layer in twin.model.layers] == [
        layer.name for layer in backbone.model.layers
    ]
    assert "global_average_pooling2d" in {layer.name for layer in twin.model.layers}
    assert twin.state_checksum() == checksum
    np.testing.assert_array_equal(twin.infer(batch, ["logits"])["logits"], before["logits"])
    assert (
        kx.keras_process_settings()
        == settings
        == {
            "floatx": "float32",
            "image_data_format": "channels_last",
            "dtype_policy": "float32",
        }
    )
    twin.close()


def test_a_changed_process_setting_refuses_to_build(kx, manifest):
    kx.keras.config.set_image_data_format("channels_first")
    try:
        with pytest.raises(FailedPrecondition, match="image_data_format"):
            load(manifest)
    finally:
        kx.keras.config.set_image_data_format("channels_last")


def test_tensorflow_thread_pools_were_set_once(kx):
    from embedwarden.server import pass_threads

    threading = kx.tf.config.threading
    assert threading.get_intra_op_parallelism_threads() == pass_threads()
    assert 1 <= threading.get_inter_op_parallelism_threads() <= 2
