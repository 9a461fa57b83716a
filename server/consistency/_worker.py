"""The consistency monitor's background thread: deduplicated jobs and a periodic callback."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Worker:
    """One background thread running deduplicated jobs, plus a periodic callback."""

    def __init__(self, interval_s: float, periodic: Callable[[], None]) -> None:
        self._interval = interval_s
        self._periodic = periodic
        self._cond = threading.Condition()
        self._jobs: dict[object, Callable[[], None]] = {}
        self._closed = False
        self._next = time.monotonic() + interval_s if interval_s > 0 else math.inf
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._loop, name="consistency", daemon=True)
            self._thread.start()

    def submit(self, key: object, job: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                return
            self._jobs.setdefault(key, job)
            self._ensure_thread()
            self._cond.notify()

    def start(self) -> None:
        with self._cond:
            if self._interval > 0:
                self._ensure_thread()

    def close(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    wait = self._next - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(None if math.isinf(wait) else wait)
                if self._closed:
                    return
                if self._jobs:
                    job = self._jobs.pop(next(iter(self._jobs)))
                else:
                    self._next = time.monotonic() + self._interval
                    job = self._periodic
            try:
                job()
            except Exception:
                log.exception("consistency job failed")
