"""Shadow verification for production code: wrap a pipeline's embed function so that a sample
of its calls is verified against the server in the background.

The caller never waits for, nor fails because of, verification: sampled calls are queued (a
bounded queue; when it is full the sample is dropped and counted) and a daemon thread sends
them to `Client.verify`. Reports go to `on_report`; errors are counted and logged, not raised.

    verified = Shadow(client, "efficientnet_lite0", layer="features", pipeline="onnx-prod")
    embed = verified.wrap(embed)        # same signature: embed(images) -> [n, dim] array
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ._api_verify import VerifyReport
from ._client import Client
from ._types import ImageLike

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class ShadowStats:
    calls: int = 0
    sampled: int = 0
    dropped: int = 0  # sampled but the queue was full
    verified: int = 0  # requests answered
    failed_items: int = 0
    errors: int = 0  # requests that raised (server down, bad input...)


class Shadow:
    def __init__(
        self,
        client: Client,
        model: str,
        *,
        layer: str = "",
        pooling: str = "default",
        normalize: bool = False,
        pipeline: str = "",
        fraction: float = 0.01,
        max_pending: int = 8,
        on_report: Callable[[VerifyReport], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.client = client
        self.model = model
        self.layer = layer
        self.pooling = pooling
        self.normalize = normalize
        self.pipeline = pipeline
        self.fraction = fraction
        self.on_report = on_report
        self.stats = ShadowStats()
        self._random = random.Random(seed)
        self._queue: queue.Queue[tuple[list[ImageLike], np.ndarray] | None] = queue.Queue(
            maxsize=max(1, max_pending)
        )
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="embedwarden-shadow", daemon=True)
        self._thread.start()

    def wrap(self, embed: F) -> F:
        """`embed(images, ...)` with a sample of its calls verified; same result, same errors."""

        def wrapped(images: Sequence[ImageLike], *args: Any, **kwargs: Any) -> Any:
            result = embed(images, *args, **kwargs)
            try:
                self.offer(images, result)
            except Exception:  # never the caller's problem
                log.exception("shadow verification: could not queue a sample")
            return result

        wrapped.__wrapped__ = embed  # type: ignore[attr-defined]
        return wrapped  # type: ignore[return-value]

    def offer(self, images: Sequence[ImageLike], vectors: Any) -> bool:
        """Queues (images, vectors) with probability `fraction`; never blocks. True if queued."""
        with self._lock:
            self.stats.calls += 1
            if self._random.random() >= self.fraction:
                return False
            self.stats.sampled += 1
        sample = (list(images), np.array(vectors, copy=True))
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
            return False
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Verifies what is queued, then stops the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> Shadow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while (sample := self._queue.get()) is not None:
            images, vectors = sample
            try:
                report = self.client.verify(
                    images,
                    vectors,
                    self.model,
                    layer=self.layer,
                    pooling=self.pooling,
                    normalize=self.normalize,
                    pipeline=self.pipeline,
                )
            except Exception as exc:
                with self._lock:
                    self.stats.errors += 1
                log.warning("shadow verification of %d inputs failed: %s", len(images), exc)
                continue
            with self._lock:
                self.stats.verified += 1
                self.stats.failed_items += report.failed
            if report.failed:
                log.warning(
                    "pipeline %s: %d of %d vectors fail verification against %s@%s",
                    report.pipeline,
                    report.failed,
                    len(report.items),
                    report.model.name,
                    report.model.version,
                )
            if self.on_report is not None:
                try:
                    self.on_report(report)
                except Exception:
                    log.exception("shadow verification: on_report raised")
