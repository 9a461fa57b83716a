"""Shared benchmark plumbing: realistic inputs, a server subprocess, timing statistics."""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedwarden.server.testing import ServerProcess

__all__ = ["ServerProcess", "concurrently", "machine", "percentiles", "photo_jpegs"]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def photo_jpegs(
    count: int, size: tuple[int, int] = (640, 480), seed: int = 0, quality: int = 90
) -> list[bytes]:
    """`count` distinct JPEGs of realistic content and size: random crops of the scikit-image
    photos, resized to `size`, with a little noise so that no two are alike."""
    from PIL import Image
    from skimage import data

    sources = [
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.astronaut(),
        np.dstack([data.camera()] * 3),
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(src[top : top + ch, left : left + cw]).resize(size, Image.BILINEAR)
        pixels = np.asarray(crop).astype(np.int16) + rng.integers(-3, 4, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": pick(0.50),
        "p99": pick(0.99),
        "mean": statistics.fmean(ordered),
        "n": float(len(ordered)),
    }


def write_json(results: dict[str, Any], path: Path | None) -> None:
    """Writes a benchmark's results where `--json` asked (the suite collects them from there)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def concurrently(worker: Callable[[int], None], clients: int) -> float:
    """Runs `worker(k)` on `clients` threads at once; returns the wall seconds until all end."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started
