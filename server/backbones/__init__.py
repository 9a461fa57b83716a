"""Framework backbones behind one `Backbone` protocol; `load_backbone` picks by manifest.

One module per framework (`_torch`, `_keras`; for text `_transformers` and `_onnx`), the
built-in EfficientNet-Lite in each, and the manifest writers for torchvision and
`keras.applications` models. Modules that import a framework are loaded on first use
(`load_backbone`, or the lazy names below), so that a server without Keras models never pays
TensorFlow's import and the client CLI stays framework-free.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import FailedPrecondition
from ..models import TEXT_LIBRARIES, Manifest, VerifiedWeights, read_verified
from ._base import Backbone

if TYPE_CHECKING:
    from ._efficientnet_lite import efficientnet_lite0
    from ._keras import KerasBackbone
    from ._keras_manifest import keras_manifest
    from ._torch import TorchBackbone
    from ._torchvision_manifest import torchvision_manifest

__all__ = [
    "Backbone",
    "KerasBackbone",
    "TorchBackbone",
    "efficientnet_lite0",
    "keras_manifest",
    "load_backbone",
    "torchvision_manifest",
]

_LAZY = {
    "efficientnet_lite0": "._efficientnet_lite",  # the architecture, for users' own pipelines
    "KerasBackbone": "._keras",
    "TorchBackbone": "._torch",
    "keras_manifest": "._keras_manifest",
    "torchvision_manifest": "._torchvision_manifest",
}


def __getattr__(name: str) -> object:
    """The framework-importing names, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def load_backbone(
    manifest: Manifest, device: str, weights_dirs: Iterable[Path] = ()
) -> tuple[Backbone, VerifiedWeights]:
    """Verifies the weights file and builds the backbone in inference mode on `device`."""
    if manifest.framework == "torch":
        from ._torch import TorchBackbone

        verified, data = read_verified(manifest, weights_dirs)
        return TorchBackbone(manifest, data, device), verified
    if manifest.framework == "keras":
        # Imported only here: a server without Keras models never pays TensorFlow's import.
        from ._keras import KerasBackbone

        verified, data = read_verified(manifest, weights_dirs)
        return KerasBackbone(manifest, data, device), verified
    if manifest.framework in ("transformers", "onnxruntime"):
        _require_text_extra(manifest)
        verified, data = read_verified(manifest, weights_dirs)
        if manifest.framework == "transformers":
            from ._transformers import TransformersBackbone

            return TransformersBackbone(manifest, data, device), verified
        from ._onnx import OnnxTextBackbone

        return OnnxTextBackbone(manifest, data, device), verified
    raise FailedPrecondition(f"{manifest.ref}: no backbone for framework {manifest.framework}")


def _require_text_extra(manifest: Manifest) -> None:
    """Text models need the `text` extra; the `server` extra alone serves image models."""
    needed = TEXT_LIBRARIES[manifest.framework]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise FailedPrecondition(
            f"{manifest.ref} is a text model and needs {', '.join(missing)}: "
            "pip install 'embedwarden[text]'"
        )
