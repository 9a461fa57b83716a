"""Input hashing of the cache path: split between the event loop and the pool for larger
requests, always the same digests in the same order as hashing one by one."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from embedwarden.server._settings import Settings
from embedwarden.server.models import RawImage, TextInput
from embedwarden.server.serving import _extraction as extraction
from embedwarden.server.serving._extraction import ExtractionService, input_digest


def _service(executor: ThreadPoolExecutor) -> ExtractionService:
    # Hashing needs only the settings and the pool; no model, cache or auditor is touched.
    return ExtractionService(None, Settings(decode_workers=2), executor, None, None)  # type: ignore[arg-type]


def _sources(count: int, size: int) -> list[bytes | RawImage | TextInput]:
    out: list[bytes | RawImage | TextInput] = [os.urandom(size) for _ in range(count)]
    out[1] = TextInput(os.urandom(size))
    out[2] = RawImage(os.urandom(size), (size // 3, 1, 3), "uint8")
    return out


@pytest.fixture
def hashed_on(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, inputs) of every chunk hashed."""
    calls: list[tuple[str, int]] = []
    digest_all = extraction._digest_all

    def recording(chunk: Sequence[extraction.InputSource]) -> list[bytes]:
        calls.append((threading.current_thread().name, len(chunk)))
        return digest_all(chunk)

    monkeypatch.setattr(extraction, "_digest_all", recording)
    return calls


def test_split_hashing_matches_one_by_one(hashed_on: list[tuple[str, int]]) -> None:
    sources = _sources(64, 16 << 10)  # 1 MiB: above SPLIT_HASH_BYTES, below INLINE_HASH_BYTES
    assert extraction.SPLIT_HASH_BYTES < 1 << 20 <= extraction.INLINE_HASH_BYTES
    with ThreadPoolExecutor(2) as pool:
        got = asyncio.run(_service(pool)._digests(sources))
    assert got == [input_digest(s) for s in sources]
    assert [n for _, n in hashed_on] == [32, 32]  # split in two (2 workers)


def test_a_busy_pool_does_not_delay_hashing(hashed_on: list[tuple[str, int]]) -> None:
    """With every worker blocked, the loop thread takes its chunks back instead of waiting."""
    sources = _sources(64, 16 << 10)
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            pool.submit(release.wait, 60)
        try:
            got = asyncio.run(_service(pool)._digests(sources))
        finally:
            release.set()
    assert got == [input_digest(s) for s in sources]
    assert {name for name, _ in hashed_on} == {threading.current_thread().name}


def test_large_requests_hash_on_the_pool(hashed_on: list[tuple[str, int]]) -> None:
    sources = _sources(4, (extraction.INLINE_HASH_BYTES // 4) + 1024)
    with ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
        got = asyncio.run(_service(pool)._digests(sources))
    assert got == [input_digest(s) for s in sources]
    assert [name.startswith("pool") for name, _ in hashed_on] == [True, True]
