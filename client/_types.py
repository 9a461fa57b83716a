"""Request types shared by `Client` and its API mixins: model references, inputs, the enum
names the client and CLI accept, and the identity of the model version that answered."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedwarden.v1 import types_pb2

from .tensor import to_tensor

ImageLike = bytes | bytearray | memoryview | np.ndarray | str | os.PathLike[str]

POOLINGS = {
    "default": types_pb2.POOLING_UNSPECIFIED,
    "none": types_pb2.POOLING_NONE,
    "avg": types_pb2.POOLING_AVG,
    "max": types_pb2.POOLING_MAX,
    "cls": types_pb2.POOLING_CLS,
    "token_mean": types_pb2.POOLING_TOKEN_MEAN,
}
DTYPES = {"float32": types_pb2.DTYPE_FLOAT32, "float16": types_pb2.DTYPE_FLOAT16}
CACHE_MODES = {
    "on": types_pb2.CACHE_MODE_ON,
    "off": types_pb2.CACHE_MODE_OFF,
    "refresh": types_pb2.CACHE_MODE_REFRESH,
}


def model_ref(model: str, version: str = "", fingerprint: str = "") -> types_pb2.ModelRef:
    """'name', or 'name@version' when `version` is not given separately. A `fingerprint`
    pins the exact version: a server whose version has another one refuses the call."""
    if "@" in model and not version:
        model, version = model.split("@", 1)
    return types_pb2.ModelRef(name=model, version=version, fingerprint=fingerprint)


class Text(str):
    """A text, for text models: wraps a `str` where a plain one would mean an image path."""

    __slots__ = ()


def image_input(image: ImageLike) -> types_pb2.Input:
    """Encoded bytes, a file path (sent as its bytes), or a uint8 H x W x 3 RGB array; or a
    `Text` (sent as UTF-8) for text models."""
    if isinstance(image, Text):
        return types_pb2.Input(text=image.encode("utf-8"))
    if isinstance(image, bytes | bytearray | memoryview):
        return types_pb2.Input(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"arrays must be uint8 [height, width, 3] RGB, got {image.dtype} {image.shape}"
            )
        return types_pb2.Input(raw=to_tensor(image))
    return types_pb2.Input(encoded=Path(image).read_bytes())


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    fingerprint: str
    weights_sha256: str

    @classmethod
    def from_proto(cls, m: types_pb2.ModelIdentity) -> ModelIdentity:
        return cls(m.name, m.version, m.fingerprint, m.weights_sha256)
