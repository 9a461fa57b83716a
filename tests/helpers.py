"""Test helpers (importable from test modules): encoding, settings, seeded weights files."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np

from embedwarden.server import Settings

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def encode(array: np.ndarray, fmt: str = "JPEG", **params: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **params)
    return buf.getvalue()


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "port": 0,
        "metrics_port": -1,
        "data_dir": data_dir,
        "max_queue_delay_ms": 2.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def seeded_torchvision_weights(torch_home: Path, arch: str, weights: str, seed: int = 0) -> Path:
    """Saves a seeded-init state dict where torch hub would cache `arch`'s `weights` file."""
    import torch
    import torchvision

    entry = torchvision.models.get_model_weights(arch)[weights]
    path = torch_home / "hub" / "checkpoints" / Path(entry.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    torch.save(model.state_dict(), path)
    return path


def seeded_keras_weights(
    path: Path, app: str, *, size: int = 224, seed: int = 0, **options: object
) -> Path:
    """Saves seeded weights of `keras.applications.<app>` (Keras 3 `.weights.h5`) at `path`.

    Every variable is drawn from a seeded numpy generator, so nothing depends on Keras' global
    seeds: kernels He-normal (signals neither vanish nor saturate), BatchNorm moving statistics
    near but not at (0, 1) so that batch statistics differ from them."""
    from embedwarden.server.backbones._keras import build_application

    model = build_application(app, size, 1000, dict(options))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if variable.name == "moving_variance":
                value = rng.uniform(0.5, 1.5, shape)
            elif variable.name == "gamma":
                value = rng.uniform(0.8, 1.2, shape)
            elif variable.name in ("moving_mean", "beta", "bias"):
                value = rng.normal(0.0, 0.1, shape)
            else:  # kernels: fan-in is kh * kw * in (depthwise: kh * kw)
                depthwise = type(layer).__name__ == "DepthwiseConv2D"
                fan_in = int(np.prod(shape[:-2] if depthwise else shape[:-1]))
                value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
            variable.assign(value.astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(path))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m embedwarden.server` as a real subprocess (for kill -9, SIGTERM, RSS)."""

    def __init__(self, data_dir: Path, *args: str, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.args = args
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: float = 180.0) -> ServerProcess:
        import os
        import sys

        self.data_dir.mkdir(parents=True, exist_ok=True)
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
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )
        from embedwarden.client import Client

        with Client(self.address, timeout=10) as client:
            try:
                client.wait_until_serving(wait)
            except TimeoutError:
                self.kill()
                raise AssertionError(
                    f"server did not serve:\n{self.log.read_text()[-3000:]}"
                ) from None
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def peak_rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")
