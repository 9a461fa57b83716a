"""Test helpers (importable from test modules): encoding, settings, seeded weights files."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from embedwarden.server import Settings
from embedwarden.server.testing import ServerProcess, free_port

__all__ = ["ServerProcess", "free_port"]  # re-exported for the test modules

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def encode(array: np.ndarray, fmt: str = "JPEG", **params: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **params)
    return buf.getvalue()


def swapped_primaries_profile() -> bytes:
    """sRGB with its red and blue colorants exchanged: stored (r, g, b) shows as sRGB (b, g, r).
    A non-sRGB profile built here, whose conversion is known exactly."""
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", profile[128:132])[0]
    entry = {bytes(profile[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, b = entry[b"rXYZ"] + 4, entry[b"bXYZ"] + 4
    profile[r : r + 8], profile[b : b + 8] = profile[b : b + 8], profile[r : r + 8]
    profile[84:100] = bytes(16)  # profile ID: no longer the MD5 of the content
    return bytes(profile)


def assert_close(actual: object, expected: object, rel: float, what: str = "") -> None:
    """Asserts max|actual - expected| <= rel * max|expected| (same shapes, no NaN).

    Float32 rounding grows with the magnitude of the values and moves with the SIMD path
    (AVX-512/AMX vs AVX2 kernels, blocking, thread count): an absolute tolerance that holds on
    values of order 1 on one CPU fails on logits of order 10 on another. The scale is the largest
    magnitude of the reference, floored at float32's smallest normal so a zero reference works."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shapes differ: {a.shape} vs {e.shape}"
    d = float(np.abs(a - e).max(initial=0.0))
    scale = max(float(np.abs(e).max(initial=0.0)), float(np.finfo(np.float32).tiny))
    assert d <= rel * scale, (
        f"{what}: max|d| {d:.3g} > {rel:g} * max|ref| {scale:.3g} (ratio {d / scale:.3g})"
    )


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


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The `embedwarden` command line in a subprocess, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "embedwarden.client", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
