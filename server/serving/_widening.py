"""Wide passes that never change a byte.

An idle CPU server may run a lone batch on every lane's cores (see `_batching`), but the promise
is "same environment, identical vectors and cache entries", and a kernel's result can depend on
its thread count (oneDNN splits some reductions by thread). So the first wide batch of each
shape and layer set runs twice, narrow and wide, and serves the narrow bytes; the shape runs
wide from then on only if the two were identical, byte for byte. oneDNN and MKL pick blocking
from the shape and the thread count, not from the values, so one comparison per shape
decides it. `bench/threads_exactness.py` measures the same over every layer. MKL runs in strict
reproducibility mode (`_frameworks.py`): that is what makes its GEMMs agree on an Intel Xeon. A
wide pass runs on the process's one team thread, whichever lane took the batch (`run_torch_pass`
says why).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

from .._frameworks import mkl_reproducibility
from ..backbones import Backbone

log = logging.getLogger(__name__)

ShapeKey = tuple[tuple[int, ...], tuple[str, ...]]


class WidePasses:
    """Runs a model's batches narrow (the lanes' thread count) or wide (`threads`; 0: this model
    never runs wide), wide only at shapes seen to give identical bytes. `on_check(identical)`
    counts each first comparison, `on_wide()` each wide batch."""

    def __init__(
        self,
        backbone: Backbone,
        threads: int,
        on_check: Callable[[bool], None] | None = None,
        on_wide: Callable[[], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.threads = threads
        self._on_check = on_check
        self._on_wide = on_wide
        self._identical: dict[ShapeKey, bool] = {}
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray, layers: Sequence[str], wide: bool) -> dict[str, np.ndarray]:
        if not wide:
            return self.backbone.infer(batch, layers)
        key = (batch.shape, tuple(sorted(set(layers))))
        with self._lock:
            identical = self._identical.get(key)
        if identical is None:
            return self._compare(key, batch, layers)
        if not identical:
            return self.backbone.infer(batch, layers)
        if self._on_wide:
            self._on_wide()
        return self.backbone.infer(batch, layers, self.threads)

    def identical_shapes(self) -> dict[ShapeKey, bool]:
        with self._lock:
            return dict(self._identical)

    def _compare(
        self, key: ShapeKey, batch: np.ndarray, layers: Sequence[str]
    ) -> dict[str, np.ndarray]:
        narrow = self.backbone.infer(batch, layers)
        wide = self.backbone.infer(batch, layers, self.threads)
        differing = [name for name in narrow if narrow[name].tobytes() != wide[name].tobytes()]
        identical = not differing
        with self._lock:
            self._identical[key] = identical
        if self._on_check:
            self._on_check(identical)
        if identical:
            log.info(
                "%s: batches of shape %s give identical bytes on %d threads: wide when idle",
                self.backbone.manifest.ref,
                list(key[0]),
                self.threads,
            )
        else:
            log.warning(
                "%s: batches of shape %s differ on %d threads (layers %s; MKL reproducibility "
                "%s): they stay narrow",
                self.backbone.manifest.ref,
                list(key[0]),
                self.threads,
                differing[:5],
                mkl_reproducibility(),
            )
        return narrow
