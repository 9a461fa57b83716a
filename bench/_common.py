"""Shared benchmark plumbing: realistic inputs, a server subprocess, timing statistics."""

from __future__ import annotations

import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedwarden.client import Client


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """An Embedwarden server in its own process (so the benchmark's client doesn't share a GIL)."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.serving_after = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "server.log").open("ab")
        cmd = [
            sys.executable,
            "-m",
            "embedwarden.server",
            "--port",
            str(self.port),
            "--metrics-port",
            "-1",
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        with Client(self.address, timeout=5) as client:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if client.health() == "SERVING":
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not become SERVING; see server.log")
                time.sleep(0.02)
        self.serving_after = time.perf_counter() - self.started_at
        return self

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


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
