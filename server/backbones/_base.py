"""What the serving layer needs from a loaded backbone, whatever its framework."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..models import Manifest


class Backbone(Protocol):
    """A loaded, verified model in inference mode that returns catalogued layer outputs."""

    manifest: Manifest
    device: str
    # Whether `infer` honours `threads` (torch image models). Keras and ONNX Runtime fix their
    # thread pools when the runtime starts; the text models' bytes depend on the thread count.
    adapts_threads: bool

    def infer(
        self, batch: np.ndarray, layers: Sequence[str], threads: int = 0
    ) -> dict[str, np.ndarray]:
        """Runs one batch (preprocessed, in the manifest's layout) and returns float32 numpy
        arrays of shape [N, *layer.shape] for each requested layer name. `threads`: intra-op
        threads for this pass (0: the server's `--torch-threads`), where `adapts_threads`."""
        ...

    def state_checksum(self) -> str:
        """SHA-256 over every in-memory parameter and buffer (names, dtypes, values)."""
        ...

    def training_modules(self) -> list[str]:
        """Names of submodules/layers that would behave as in training; must be empty."""
        ...

    def set_training(self, module_name: str, training: bool) -> None:
        """Switches one submodule's mode (fault injection in tests; never used when serving)."""
        ...

    def close(self) -> None:
        """Releases memory (and device memory) held by the model."""
        ...
