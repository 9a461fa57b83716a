"""The same code path on a GPU: the default model served on CUDA agrees with the CPU within the
manifest's tolerance, and the server picks CUDA with --device auto. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_settings
from PIL import Image

from embedwarden.client import Client
from embedwarden.server import build_registry
from embedwarden.server.backbones._torch import TorchBackbone
from embedwarden.server.models._preprocess import Preprocessor
from embedwarden.server.models._weights import read_verified
from embedwarden.server.testing import ServerThread

pytestmark = pytest.mark.gpu
MANIFEST = build_registry().resolve("efficientnet_lite0")


def test_cuda_and_cpu_agree_within_the_manifest_tolerance(photo_arrays):
    pre = Preprocessor(MANIFEST.preprocess)
    batch = np.stack([pre(Image.fromarray(a)) for a in photo_arrays.values()])
    data = read_verified(MANIFEST)[1]
    cpu = TorchBackbone(MANIFEST, data, "cpu").infer(batch, ["features", "logits"])
    gpu = TorchBackbone(MANIFEST, data, "cuda").infer(batch, ["features", "logits"])
    tol = MANIFEST.consistency
    for layer in ("features", "logits"):
        np.testing.assert_allclose(gpu[layer], cpu[layer], atol=tol.atol * 10, rtol=tol.rtol)
        assert (gpu["logits"].argmax(1) == cpu["logits"].argmax(1)).all()


def test_auto_device_serves_on_cuda(tmp_path, photos):
    thread = ServerThread(make_settings(tmp_path, device="auto"))
    thread.start()
    try:
        assert thread.app.device.startswith("cuda")
        with Client(thread.address) as client:
            info = client.describe_model("efficientnet_lite0")
            assert info.device.startswith("cuda")
            result = client.extract([photos["chelsea"]], "efficientnet_lite0", layers="logits")
            assert int(np.argmax(result.array[0])) in {281, 282, 283, 284, 285}
            assert client.check_consistency().passed
    finally:
        thread.stop()
