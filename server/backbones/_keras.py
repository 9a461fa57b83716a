"""Keras 3 backbones (TensorFlow backend): `keras.applications` models and EfficientNet-Lite0.

Builders: `keras:<ApplicationName>` (e.g. `keras:MobileNetV2`, `keras:ResNet50`) built with
`weights=None` and an explicitly named input, then loaded from the verified weights file; and
`efficientnet_lite0`, the Keras port of the built-in model, converted from the very same PyTorch
state dict (`_efficientnet_lite_keras`). Nothing is downloaded: `keras.utils.get_file` is never
called (it switches cache folders when ~/.keras is read-only and some applications pass it no
hash); the file comes from `models.read_verified` and is hashed on every load.

Serving guarantees, as for torch models:
- inference always calls the model with `training=False`, through one `tf.function` per layer
  set (fixed input signature, traced once); the model is also frozen (`trainable = False`), so
  under Keras 3 semantics even a call with training=True would not move BatchNorm statistics;
- intermediate layers come from `keras.Model(inputs, [tap outputs])`, built once per layer set
  and cached; outputs are NHWC (the catalogue's layout is `HWC`);
- nothing process-wide is changed: no `clear_session()` (it would reset state other live Keras
  models depend on), no `floatx`, `image_data_format` or dtype policy changes; a load refuses when
  someone else changed them, since the model would silently build with other numerics. Tap
  names never depend on Keras' auto-naming counters (which count up across every model built in
  the process): the input and every layer of the Lite0 port are named explicitly, and layers a
  keras.applications builder leaves unnamed are renamed to what a fresh process would call them
  (`stabilize_auto_names`). TensorFlow's thread pools, determinism, TF32 and GPU memory growth
  are set once, in `_frameworks.import_tensorflow`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import FailedPrecondition, ManifestError
from .._frameworks import import_tensorflow, import_torch
from ..models import Manifest

tf = import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, which import_tensorflow orders after torch)

from ._efficientnet_lite_keras import (  # noqa: E402
    build_efficientnet_lite0,
    load_torch_state_dict,
)

log = logging.getLogger(__name__)

APPLICATION_PREFIX = "keras:"
# Set by the backbone itself; an `options` entry may not override them.
RESERVED_OPTIONS = frozenset({"weights", "input_tensor", "input_shape", "classes"})
# Keras' own file formats, by suffix (the file name in the manifest keeps its suffix).
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")
EXPECTED_PROCESS_SETTINGS = {
    "floatx": "float32",
    "image_data_format": "channels_last",
    "dtype_policy": "float32",
}
MAX_CACHED_RUNNERS = 16

Runner = Callable[[Any], Any]


def keras_process_settings() -> dict[str, str]:
    """The process-wide Keras settings that change how a model is built."""
    return {
        "floatx": keras.config.floatx(),
        "image_data_format": keras.config.image_data_format(),
        "dtype_policy": keras.config.dtype_policy().name,
    }


def _check_process_settings(ref: str) -> None:
    changed = {
        key: value
        for key, value in keras_process_settings().items()
        if value != EXPECTED_PROCESS_SETTINGS[key]
    }
    if changed:
        raise FailedPrecondition(
            f"{ref}: process-wide Keras settings were changed ({changed}; expected "
            f"{EXPECTED_PROCESS_SETTINGS}); a model built now would not have its pinned "
            "numerics. Something in this process called keras.config.set_*: remove that call"
        )


def application(name: str) -> Any:
    """The `keras.applications` constructor called `name`, or a ManifestError naming the valid
    ones."""
    constructor = getattr(keras.applications, name, None)
    if not name[:1].isupper() or not callable(constructor):
        known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ManifestError(
            f"architecture.builder 'keras:{name}': keras.applications has no such model; "
            f"known: {', '.join(known)}"
        )
    return constructor


def _snake(class_name: str) -> str:
    """The prefix Keras gives an unnamed layer of this class (as `keras.utils` spells it)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def stabilize_auto_names(model: Any) -> list[str]:
    """Renames layers that Keras named automatically to the names a fresh process would give.

    An unnamed layer is called `<class>_<N>`, N counting every such layer the process ever
    built: the second MobileNetV2 of a process has `global_average_pooling2d_1`. Renamed in
    model order (`x`, `x_1`, ...), tap names and checksums no longer depend on what else was
    built before. Returns the renamed layers' new names.
    """
    counts: dict[str, int] = {}
    explicit: set[str] = set()
    plan: list[tuple[Any, str]] = []
    for layer in model.layers:
        base = _snake(type(layer).__name__)
        if re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name):
            n = counts.get(base, 0)
            counts[base] = n + 1
            plan.append((layer, base if n == 0 else f"{base}_{n}"))
        else:
            explicit.add(layer.name)
    renamed: list[str] = []
    for layer, name in plan:
        if name in explicit:
            raise ManifestError(f"cannot give auto-named layer {layer.name} the stable name {name}")
        if layer.name != name:
            layer.name = name
            renamed.append(name)
    return renamed


def build_application(name: str, size: int, num_classes: int, options: dict[str, Any]) -> Any:
    """`keras.applications.<name>` with weights=None, an explicitly named input, stable names."""
    constructor = application(name)
    reserved = sorted(RESERVED_OPTIONS & set(options))
    if reserved:
        raise ManifestError(f"architecture.options {reserved} are set by the server")
    # An explicit name: the default `input_layer_N` counts up across every model of the process.
    inputs = keras.Input((size, size, 3), dtype="float32", name="input")
    try:
        model = constructor(weights=None, input_tensor=inputs, classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"cannot build keras:{name}: {exc}") from None
    stabilize_auto_names(model)
    return model


def build_model(manifest: Manifest) -> Any:
    """The untrained Keras model of a manifest (channels-last, float32, explicitly named)."""
    arch = manifest.architecture
    size = manifest.preprocess.size
    options = dict(arch.options)
    if arch.builder == "efficientnet_lite0":
        unknown = sorted(set(options) - {"input_size"})
        if unknown:
            raise ManifestError(f"architecture.options {unknown}: not options of {arch.builder}")
        if options.get("input_size", size) != size:
            raise ManifestError("architecture.options.input_size must equal preprocess.size")
        return build_efficientnet_lite0(keras, input_size=size, num_classes=arch.num_classes)
    if not arch.builder.startswith(APPLICATION_PREFIX):
        raise ManifestError(
            f"architecture.builder {arch.builder!r}: a Keras model is 'keras:<application>' "
            "(e.g. 'keras:MobileNetV2') or 'efficientnet_lite0'"
        )
    try:
        return build_application(
            arch.builder.removeprefix(APPLICATION_PREFIX), size, arch.num_classes, options
        )
    except ManifestError as exc:
        raise ManifestError(f"{manifest.ref}: {exc}") from None


def _load_keras_weights(model: Any, manifest: Manifest, data: bytes) -> None:
    """Loads the verified bytes through Keras' own reader, from a private temporary copy.

    Loading the bytes that were hashed (not the path again) leaves no window for the file to
    change between the check and the load. Keras refuses many mismatches itself, but not all:
    a group it cannot find in the file is skipped with a mere warning, leaving those layers at
    their random initial values. So every float variable is set to NaN first, and any variable
    the file did not overwrite with finite values refuses the load.
    """
    file_name = manifest.weights.file
    if not file_name.endswith(WEIGHT_SUFFIXES):
        raise ManifestError(
            f"weights.file {file_name!r}: a keras_weights file ends with one of "
            f"{list(WEIGHT_SUFFIXES)} (Keras picks the reader by suffix)"
        )
    floats = [v for v in model.weights if np.dtype(v.dtype).kind == "f"]
    for variable in floats:
        variable.assign(np.full(tuple(variable.shape), np.nan, dtype=np.dtype(variable.dtype)))
    with tempfile.TemporaryDirectory(prefix="embedwarden-keras-") as folder:
        path = Path(folder) / file_name
        path.write_bytes(data)
        try:
            model.load_weights(str(path))
        except (ValueError, KeyError, OSError) as exc:
            raise ManifestError(
                f"{manifest.ref}: weights file {file_name} does not match architecture "
                f"{manifest.architecture.builder}: {exc}"
            ) from None
    unset = [v.path for v in floats if not np.isfinite(v.numpy()).all()]
    if unset:
        raise ManifestError(
            f"{manifest.ref}: weights file {file_name} does not match architecture "
            f"{manifest.architecture.builder}: {len(unset)} of {len(floats)} variables were not "
            f"loaded from it (or are not finite), e.g. {unset[:4]}"
        )


def _load_weights(model: Any, manifest: Manifest, data: bytes) -> None:
    fmt = manifest.weights.format
    if fmt == "keras_weights":
        _load_keras_weights(model, manifest, data)
    elif fmt == "torch_state_dict" and manifest.architecture.builder == "efficientnet_lite0":
        torch = import_torch()  # already imported: torch always loads before TensorFlow
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        try:
            load_torch_state_dict(model, state)
        except ManifestError as exc:
            raise ManifestError(f"{manifest.ref}: {exc}") from None
    else:
        raise ManifestError(
            f"{manifest.ref}: weights.format {fmt!r} cannot be loaded into Keras model "
            f"{manifest.architecture.builder} (keras_weights; torch_state_dict only for "
            "efficientnet_lite0)"
        )


def _tf_device(device: str) -> str:
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        gpus = tf.config.list_logical_devices("GPU")
        if int(index) < len(gpus):
            return f"/GPU:{index}"
        raise FailedPrecondition(
            f"device {device}: TensorFlow sees {len(gpus)} GPU(s) (install a CUDA build of "
            "tensorflow, or serve Keras models from a --device cpu server)"
        )
    return "/CPU:0"


class KerasBackbone:
    """A verified Keras model, frozen, serving catalogued layers in NHWC."""

    adapts_threads = False

    def __init__(self, manifest: Manifest, weights: bytes, device: str) -> None:
        self.manifest = manifest
        self.device = device
        if manifest.numerics.dtype != "float32":
            raise ManifestError(
                f"{manifest.ref}: Keras models are served in float32 only (a float16 policy "
                "would be process-wide)"
            )
        if manifest.preprocess.layout != "NHWC":
            raise ManifestError(f"{manifest.ref}: Keras models take NHWC input; set layout")
        _check_process_settings(manifest.ref)
        self._tf_device = _tf_device(device)
        with tf.device(self._tf_device):
            model = build_model(manifest)
            self._check_numerics(model)
            _load_weights(model, manifest, weights)
        model.trainable = False  # frozen: BatchNorm never uses batch statistics
        self.model = model
        self._nodes = {layer.name: layer.node for layer in manifest.layers}
        self._check_nodes()
        size = manifest.preprocess.size
        self._signature = tf.TensorSpec([None, size, size, 3], tf.float32)
        self._runners: dict[tuple[str, ...], Runner] = {}
        self._lock = threading.Lock()

    def _check_numerics(self, model: Any) -> None:
        odd = [
            f"{layer.name}:{layer.dtype_policy.name}"
            for layer in model.layers
            if layer.dtype_policy.name != "float32"
        ]
        if odd:
            raise FailedPrecondition(
                f"{self.manifest.ref}: layers built with a non-float32 dtype policy: {odd[:5]}"
            )

    def _check_nodes(self) -> None:
        names = {layer.name for layer in self.model.layers}
        missing = sorted(node for node in set(self._nodes.values()) if node not in names)
        if missing:
            sample = [layer.name for layer in self.model.layers]
            raise ManifestError(
                f"{self.manifest.ref}: layer nodes {missing} are not layers of the Keras model "
                f"(some layers: {sample[:5]} ... {sample[-5:]})"
            )

    # --- inference ------------------------------------------------------------------------

    def _runner(self, layers: tuple[str, ...]) -> Runner:
        with self._lock:
            runner = self._runners.get(layers)
            if runner is None:
                outputs = {name: self.model.get_layer(self._nodes[name]).output for name in layers}
                # The one input tensor itself: keras.applications models hold a list of one,
                # and calling a list-input model with a tensor warns on every trace.
                (inputs,) = self.model.inputs
                extractor = keras.Model(inputs, outputs, name=f"{self.model.name}_taps")

                # A partial, not a closure: TensorFlow's retracing warning keys on a function's
                # code object, which every closure made here shares (one trace each is the plan).
                runner = tf.function(
                    functools.partial(extractor, training=False),
                    input_signature=[self._signature],
                    autograph=False,
                    jit_compile=False,
                )
                if len(self._runners) >= MAX_CACHED_RUNNERS:
                    self._runners.pop(next(iter(self._runners)))
                self._runners[layers] = runner
            return runner

    def infer(
        self, batch: np.ndarray, layers: Sequence[str], threads: int = 0
    ) -> dict[str, np.ndarray]:
        key = tuple(sorted(set(layers)))
        runner = self._runner(key)
        with tf.device(self._tf_device):
            outputs = runner(tf.convert_to_tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return {name: np.asarray(outputs[name].numpy(), dtype=np.float32) for name in key}

    # --- consistency ----------------------------------------------------------------------

    def state_checksum(self) -> str:
        """Over every variable, trainable or not: BatchNorm moving mean/variance included."""
        digest = hashlib.sha256()
        seen: set[int] = set()
        for layer in self.model.layers:  # stable layer names; variable paths keep auto-names
            for variable in layer.weights:
                if id(variable) in seen:
                    continue
                seen.add(id(variable))
                value = np.ascontiguousarray(variable.numpy())
                digest.update(f"{layer.name}/{variable.name}".encode())
                digest.update(str(value.dtype).encode())
                digest.update(value.tobytes())
        if len(seen) != len(self.model.weights):
            raise RuntimeError(f"{self.manifest.ref}: variables outside model.layers")
        return digest.hexdigest()

    def training_modules(self) -> list[str]:
        """Layers that run as in training: those whose call was forced into training mode.

        Keras layers have no mode flag; training behaviour comes only from the `training`
        argument, which this backbone always passes as False. A layer can still run as in
        training if its `call` was replaced on the instance (that is how `set_training` injects
        the fault, and what any other code patching a layer would do): those are reported.
        """
        return [layer.name for layer in self.model.layers if "call" in vars(layer)]

    def set_training(self, module_name: str, training: bool) -> None:
        """Fault injection: makes layer `module_name` run as in training, whatever it is called
        with (it is unfrozen and its `call` always gets training=True: a BatchNorm then uses
        batch statistics and updates its moving mean/variance, like a torch module in train()).
        Never used when serving. Cached graphs are dropped so that the change takes effect."""
        try:
            layer = self.model.get_layer(module_name)
        except ValueError:
            raise ManifestError(f"{self.manifest.ref}: no Keras layer {module_name!r}") from None
        if training and "call" not in vars(layer):
            original = layer.call

            def call(*args: Any, **kwargs: Any) -> Any:
                kwargs["training"] = True
                return original(*args, **kwargs)

            layer.trainable = True
            layer.call = call
        elif not training and "call" in vars(layer):
            del layer.call
            layer.trainable = False
        with self._lock:
            self._runners.clear()

    def close(self) -> None:
        """Drops this model's graphs and variables. Never `clear_session()`: other Keras models
        in the process are still live."""
        with self._lock:
            self._runners.clear()
        del self.model
