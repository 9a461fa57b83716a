"""The data directory's disk: free space, the reserve the cache leaves free, the one translation
of a full disk into `DiskFull`, a writability check at start, and logging of repeated
background failures once per interval.

A full disk shows up as `OSError(ENOSPC)` from Python's own I/O, as `lmdb.DiskError` ("No space
left on device") from LMDB, as `lmdb.Error` "Input/output error" when LMDB's write came back
short (its report of a filesystem that filled during the write), and as a `RuntimeError`
naming the errno from FAISS: `is_disk_full` recognises them all, so every write path maps them
the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from ._errors import DiskFull, FailedPrecondition

log = logging.getLogger(__name__)

# Default reserve: what a snapshot of a 100,000 x 1280 float32 collection (~0.5 GB) and the
# log's growth need, but never more than a tenth of a small filesystem.
DEFAULT_RESERVE_BYTES = 1 << 30
DEFAULT_RESERVE_FRACTION = 0.10
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(e) for e in _FULL_ERRNOS)
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_SHORT_WRITE_TEXT = os.strerror(errno.EIO)
SHORT_WRITE_FREE_BYTES = 64 << 20  # an EIO with less free than this is taken as a full disk


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (the data dir may not exist yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding `path`."""
    st = os.statvfs(_existing(path))
    return int(st.f_bavail * st.f_frsize)


def total_bytes(path: Path) -> int:
    st = os.statvfs(_existing(path))
    return int(st.f_blocks * st.f_frsize)


def reserve_bytes(path: Path, configured: int) -> int:
    """The free space the cache leaves on `path`'s filesystem: `configured` when it is >= 0,
    else the default (1 GiB, or a tenth of the filesystem when that is smaller)."""
    if configured >= 0:
        return configured
    return min(DEFAULT_RESERVE_BYTES, int(total_bytes(path) * DEFAULT_RESERVE_FRACTION))


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    """Whether `exc` means "no space left" (ENOSPC, EDQUOT), whatever library raised it; with
    `path`, also an I/O error (LMDB's short write) while that filesystem is nearly full."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc)
    if any(t in text for t in _FULL_TEXTS):
        return True
    if path is None or _SHORT_WRITE_TEXT not in text:
        return False
    try:
        return free_bytes(path) < SHORT_WRITE_FREE_BYTES
    except OSError:
        return False


def disk_full(data_dir: Path, what: str) -> DiskFull:
    """The client-facing error for a write that found the disk full."""
    try:
        free, total = free_bytes(data_dir), total_bytes(data_dir)
        space = f"{free:,} bytes free of {total:,}"
    except OSError:
        space = "free space unknown"
    return DiskFull(
        f"{what}: the data directory {data_dir} is full ({space}); nothing of this request "
        "was stored. Free space on that filesystem and retry (no restart needed)"
    )


def check_writable(data_dir: Path) -> None:
    """Refuses to start on a data directory that cannot be written (read-only mount, wrong
    owner), with one clear line instead of a traceback from the first component that tries."""
    probe = data_dir / f".write-probe-{os.getpid()}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        if exc.errno in _READ_ONLY_ERRNOS:
            raise FailedPrecondition(
                f"the data directory {data_dir} is not writable ({exc.strerror}): the cache, "
                "the collections' write-ahead log and the golden records live there. Mount it "
                "read-write or give --data-dir a writable folder"
            ) from None
        if exc.errno not in _FULL_ERRNOS:  # a full disk at start is served (writes refused)
            raise


class FailureLog:
    """Logs a repeated background failure at once, then at most once per `interval_s` with the
    count since, so that a full disk costs one line a minute rather than one per batch."""

    def __init__(self, logger: logging.Logger, what: str, interval_s: float = 60.0) -> None:
        self._log = logger
        self._what = what
        self._interval = interval_s
        self._lock = threading.Lock()
        self._count = 0  # failures since the last line
        self._last = -float("inf")

    def failed(self, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if now - self._last < self._interval:
                return
            count, self._count, self._last = self._count, 0, now
        self._log.error(
            "%s failed %d time(s) since the last report (%s); next report in %.0fs at most",
            self._what,
            count,
            detail,
            self._interval,
        )

    def recovered(self) -> None:
        """Call after a success: logs how many failures were not reported yet, if any."""
        with self._lock:
            if self._last == -float("inf"):
                return
            count, self._count, self._last = self._count, 0, -float("inf")
        self._log.warning(
            "%s works again%s", self._what, f" ({count} more failure(s) before)" if count else ""
        )
