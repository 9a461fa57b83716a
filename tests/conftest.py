"""Shared fixtures: real photos, seeded weights files, and a real server on port 0."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import encode, make_settings

from embedwarden.client import Client

# Server first: it imports torch/torchvision before anything can import TensorFlow.
from embedwarden.server.testing import ServerThread

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PHOTO_NAMES = ("chelsea", "coffee", "rocket", "astronaut")


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def photos(photo_arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Real photos (scikit-image) as JPEG bytes, quality 95."""
    return {name: encode(a, "JPEG", quality=95) for name, a in photo_arrays.items()}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One real server for the session, serving the built-in default model."""
    with ServerThread(make_settings(tmp_path_factory.mktemp("server-data"))) as thread:
        yield thread


@pytest.fixture()
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=120) as c:
        yield c


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
