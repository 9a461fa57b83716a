"""EfficientNet-Lite0 in Keras (NHWC), loaded from the same PyTorch state dict as the torch model.

Every Keras layer that has weights is named after the torch module it mirrors (`_conv_stem`,
`_blocks.3._expand_conv`, `_fc`, ...), so the conversion is a name-for-name copy with the layout
changes Keras needs, and it is strict: every state-dict tensor is used once (BatchNorm's
`num_batches_tracked` counters aside, which inference never reads), every Keras variable is
written once, and every shape must match. The tap points carry the torch node names too
(`_stem_act`, `_blocks.N`, `_head_act`, `_fc`), so both manifests share their layer catalogue.

Equivalences with the torch port (`_efficientnet_lite.py`):
- TF "SAME" padding is what Keras' `padding="same"` does on the TensorFlow backend (the extra
  pixel of an odd total goes after), which the torch port reproduces with static pads;
- BatchNorm eps 1e-3; Keras momentum is 1 - torch momentum (0.99), used only in training;
- ReLU6, global average pooling, a dense classifier producing logits (no softmax).
Layouts: conv [out, in, kh, kw] -> [kh, kw, in, out]; depthwise [C, 1, kh, kw] -> [kh, kw, C, 1];
linear [out, in] -> [in, out].

Names are explicit everywhere (the input and the model too), so that building this model never
depends on Keras' process-wide auto-naming counters, whatever else the process has built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import ManifestError
from ._efficientnet_lite import BN_EPS, BN_MOMENTUM, HEAD_CHANNELS, LITE0_STAGES, STEM_CHANNELS

IGNORED_SUFFIXES = (".num_batches_tracked",)


def build_efficientnet_lite0(
    keras: Any, input_size: int = 224, num_classes: int = 1000, name: str = "efficientnet_lite0"
) -> Any:
    """The untrained Keras functional model (channels-last, float32)."""
    layers = keras.layers

    def conv(filters: int, kernel: int, stride: int, layer_name: str) -> Any:
        return layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=layer_name
        )

    def bn(layer_name: str) -> Any:
        return layers.BatchNormalization(
            axis=-1, epsilon=BN_EPS, momentum=1.0 - BN_MOMENTUM, name=layer_name
        )

    def relu6(layer_name: str) -> Any:
        return layers.ReLU(max_value=6.0, name=layer_name)

    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="input")
    x = conv(STEM_CHANNELS, 3, 2, "_conv_stem")(inputs)
    x = bn("_bn0")(x)
    x = relu6("_stem_act")(x)
    index = 0
    for stage in LITE0_STAGES:
        for i in range(stage.repeats):
            in_ch = stage.in_channels if i == 0 else stage.out_channels
            stride = stage.stride if i == 0 else 1
            prefix = f"_blocks.{index}"
            block_input = x
            mid = in_ch * stage.expand
            if stage.expand != 1:
                x = conv(mid, 1, 1, f"{prefix}._expand_conv")(x)
                x = bn(f"{prefix}._bn0")(x)
                x = relu6(f"{prefix}._expand_act")(x)
            x = layers.DepthwiseConv2D(
                stage.kernel,
                strides=stride,
                padding="same",
                use_bias=False,
                name=f"{prefix}._depthwise_conv",
            )(x)
            x = bn(f"{prefix}._bn1")(x)
            x = relu6(f"{prefix}._depthwise_act")(x)
            x = conv(stage.out_channels, 1, 1, f"{prefix}._project_conv")(x)
            x = bn(f"{prefix}._bn2")(x)
            if stride == 1 and in_ch == stage.out_channels:
                x = layers.Add(name=prefix)([x, block_input])
            else:  # a named tap point for the block's output, as in the torch model
                x = layers.Identity(name=prefix)(x)
            index += 1
    x = conv(HEAD_CHANNELS, 1, 1, "_conv_head")(x)
    x = bn("_bn1")(x)
    x = relu6("_head_act")(x)
    x = layers.GlobalAveragePooling2D(name="_avg_pooling")(x)
    outputs = layers.Dense(num_classes, name="_fc")(x)
    return keras.Model(inputs, outputs, name=name)


def _variables_by_torch_key(layer: Any) -> dict[str, tuple[Any, tuple[int, ...] | None]]:
    """torch key suffix -> (Keras variable, axes permutation from torch to Keras layout)."""
    kind = type(layer).__name__
    if kind == "Conv2D":
        return {"weight": (layer.kernel, (2, 3, 1, 0))}
    if kind == "DepthwiseConv2D":
        return {"weight": (layer.kernel, (2, 3, 0, 1))}
    if kind == "BatchNormalization":
        return {
            "weight": (layer.gamma, None),
            "bias": (layer.beta, None),
            "running_mean": (layer.moving_mean, None),
            "running_var": (layer.moving_variance, None),
        }
    if kind == "Dense":
        return {"weight": (layer.kernel, (1, 0)), "bias": (layer.bias, None)}
    if layer.weights:
        raise ManifestError(f"no torch conversion for Keras layer {layer.name} ({kind})")
    return {}


def load_torch_state_dict(model: Any, state: Mapping[str, Any]) -> int:
    """Copies a torch state dict into `model`, strictly; returns the number of tensors copied."""
    arrays = {key: value.detach().cpu().numpy() for key, value in state.items()}
    used: set[str] = set()
    assigned: set[int] = set()
    for layer in model.layers:
        for suffix, (variable, axes) in _variables_by_torch_key(layer).items():
            key = f"{layer.name}.{suffix}"
            if key not in arrays:
                raise ManifestError(f"state dict has no {key!r} for Keras layer {layer.name}")
            value = arrays[key] if axes is None else np.transpose(arrays[key], axes)
            if tuple(value.shape) != tuple(variable.shape):
                raise ManifestError(
                    f"{key}: shape {list(arrays[key].shape)} becomes {list(value.shape)} in "
                    f"Keras layout; layer {layer.name} needs {list(variable.shape)}"
                )
            if value.dtype != np.float32:
                raise ManifestError(f"{key}: expected float32, got {value.dtype}")
            variable.assign(np.ascontiguousarray(value))
            used.add(key)
            assigned.add(id(variable))
    unused = sorted(k for k in arrays if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if unused:
        raise ManifestError(f"state dict tensors with no Keras counterpart: {unused[:8]}")
    unset = [v.path for v in model.weights if id(v) not in assigned]
    if unset:
        raise ManifestError(f"Keras variables not loaded from the state dict: {unset[:8]}")
    return len(used)
