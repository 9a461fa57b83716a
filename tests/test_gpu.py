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


def test_restart_and_coload_are_bit_identical_on_the_gpu(tmp_path):
    """Deterministic settings on the device (cuDNN benchmark off, deterministic algorithms, TF32
    off): a restart from the same data dir, and loading a second model beside the first, give
    the golden outputs exactly; the batch check stays within the manifest's tolerance."""
    models = tmp_path / "models"  # a second torch model (same weights, another name) to co-load
    models.mkdir()
    text = MANIFEST.text.replace('name = "efficientnet_lite0"', 'name = "lite0_copy"')
    (models / "lite0_copy@1.toml").write_text(text.replace("default = true\n", ""))
    data = tmp_path / "data"
    first = ServerThread(make_settings(data, device="cuda", models_dirs=(models,)))
    first.start()
    first.stop()
    second = ServerThread(make_settings(data, device="cuda", models_dirs=(models,)))
    second.start()
    try:
        with Client(second.address) as client:
            client.load_model("lite0_copy")
            report = client.check_consistency("efficientnet_lite0")
        rows = {(r.check, r.layer): r for r in report.results}
        for check in ("restart", "coload"):
            row = rows[(check, "")]
            assert row.passed and row.max_abs_diff == 0.0, (check, row)
        batch = rows[("batch", "")]
        assert batch.passed and batch.max_abs_diff <= batch.tolerance_abs, batch
    finally:
        second.stop()


def test_the_golden_record_states_the_tf32_state(tmp_path):
    import json

    thread = ServerThread(make_settings(tmp_path, device="cuda"))
    thread.start()
    thread.stop()
    (record,) = (tmp_path / "golden").glob("efficientnet_lite0@1-*/record.json")
    environment = json.loads(record.read_text())["environment"]
    tf32 = {k: environment[k] for k in ("cuda_matmul_tf32", "cudnn_tf32")}
    assert tf32 == {"cuda_matmul_tf32": "False", "cudnn_tf32": "False"}, tf32
