"""Framework backbones behind one `Backbone` protocol; `load_backbone` picks by manifest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .._errors import FailedPrecondition
from .._manifest import Manifest
from .._weights import VerifiedWeights, read_verified
from ._base import Backbone

__all__ = ["Backbone", "load_backbone"]


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
    raise FailedPrecondition(f"{manifest.ref}: no backbone for framework {manifest.framework}")
