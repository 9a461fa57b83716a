"""Test helpers (importable from test modules): encoding, settings, seeded weights files."""

from __future__ import annotations

import io
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
