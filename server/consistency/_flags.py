"""Process-wide numeric flags (thread counts, TF32, determinism, ...) watched while running: a
change is counted and logged, and the flags check fails while any differs from the start."""

from __future__ import annotations

import logging
import threading

from .._frameworks import process_flags
from .._metrics import METRICS

log = logging.getLogger(__name__)


class FlagWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._baseline = process_flags()
        self._last = dict(self._baseline)
        METRICS.set_flags(self._baseline)

    def observe(self) -> list[str]:
        """Counts changes since the last look; returns the flags that differ from the start,
        in words ("name old -> new")."""
        current = process_flags()
        with self._lock:
            for key, value in current.items():
                if key not in self._baseline:
                    self._baseline[key] = value  # a framework imported since: no change
                elif self._last.get(key) != value:
                    METRICS.process_flag_changes.labels(key).inc()
                    log.error(
                        "process flag %s changed while running: %s -> %s",
                        key,
                        self._last.get(key),
                        value,
                    )
            for key in set(self._last) - set(current):
                METRICS.process_flag_changes.labels(key).inc()
            if current != self._last:
                METRICS.set_flags(current)
            self._last = dict(current)
            return [
                f"{k} {v} -> {current.get(k, '(absent)')}"
                for k, v in sorted(self._baseline.items())
                if current.get(k) != v
            ]
