"""The same code path on a GPU: the default model served on CUDA agrees with the CPU within the
manifest's tolerance, and the server picks CUDA with --device auto; the nvjpeg decoder agrees with
Pillow within a stated tolerance and repeats itself exactly. Skipped without CUDA."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import encode, make_settings
from PIL import Image

from embedwarden.client import Client
from embedwarden.server import build_registry
from embedwarden.server.backbones._torch import TorchBackbone
from embedwarden.server.models import LEGACY_DECODE, RECOMMENDED_DECODE, decode, require_decoder
from embedwarden.server.models._preprocess import Preprocessor
from embedwarden.server.models._weights import read_verified
from embedwarden.server.testing import ServerThread

pytestmark = pytest.mark.gpu
MANIFEST = build_registry().resolve("efficientnet_lite0")
# libjpeg-turbo (Pillow) and nvJPEG differ in IDCT and chroma upsampling by about one level on a
# photo; 1.5 levels of 255 (0.6%) mean |d| bounds that, and a real bug (wrong colour conversion,
# a transposed or shifted image) is tens of levels.
NVJPEG_MEAN_ABS_LEVELS = 1.5
MAX_PIXELS = 40_000_000


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
    with ServerThread(make_settings(tmp_path, device="auto")) as thread:
        assert thread.app.device.startswith("cuda")
        with Client(thread.address) as client:
            info = client.describe_model("efficientnet_lite0")
            assert info.device.startswith("cuda")
            result = client.extract([photos["chelsea"]], "efficientnet_lite0", layers="logits")
            assert int(np.argmax(result.array[0])) in {281, 282, 283, 284, 285}
            assert client.check_consistency().passed


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


def nvjpeg_manifest_dir(folder) -> None:
    folder.mkdir()
    text = MANIFEST.text.replace('name = "efficientnet_lite0"', 'name = "lite0_nvjpeg"')
    text = text.replace('decoder = "pillow"', 'decoder = "nvjpeg"').replace("default = true\n", "")
    (folder / "lite0_nvjpeg@1.toml").write_text(text)


def mean_abs_levels(a: Image.Image, b: Image.Image) -> tuple[float, int]:
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert x.shape == y.shape, (x.shape, y.shape)
    d = np.abs(x - y)
    return float(d.mean()), int(d.max())


def test_nvjpeg_matches_pillow_within_tolerance_and_repeats_exactly(photo_arrays):
    require_decoder("nvjpeg", "test")  # nvJPEG works here (the probe decode)
    data = encode(photo_arrays["chelsea"], "JPEG", quality=90)
    pillow = decode(data, MAX_PIXELS, LEGACY_DECODE, "pillow")
    first = decode(data, MAX_PIXELS, LEGACY_DECODE, "nvjpeg")
    second = decode(data, MAX_PIXELS, LEGACY_DECODE, "nvjpeg")
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))  # deterministic
    mean, worst = mean_abs_levels(first, pillow)
    print(f"nvJPEG vs Pillow, chelsea q90: mean |d| {mean:.3f} levels, max {worst}")
    assert mean <= NVJPEG_MEAN_ABS_LEVELS, (mean, worst)


def test_nvjpeg_applies_exif_orientation_like_pillow(photo_arrays):
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(photo_arrays["chelsea"]).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    data = buffer.getvalue()
    pillow = decode(data, MAX_PIXELS, RECOMMENDED_DECODE, "pillow")
    nvjpeg = decode(data, MAX_PIXELS, RECOMMENDED_DECODE, "nvjpeg")
    assert nvjpeg.size == pillow.size == (300, 451)  # upright: the stored 451 x 300 turned
    mean, worst = mean_abs_levels(nvjpeg, pillow)
    assert mean <= NVJPEG_MEAN_ABS_LEVELS, (mean, worst)


def test_an_nvjpeg_version_serves_and_is_bit_identical_after_a_restart(tmp_path, photos):
    models = tmp_path / "models"
    nvjpeg_manifest_dir(models)
    inputs = [photos["chelsea"], photos["coffee"]]
    settings = make_settings(
        tmp_path / "data",
        device="cuda",
        models=("efficientnet_lite0", "lite0_nvjpeg"),
        models_dirs=(models,),
    )
    vectors = []
    for _ in range(2):  # the second start runs the restart check against the first's golden
        with ServerThread(settings) as thread, Client(thread.address) as client:
            info = client.describe_model("lite0_nvjpeg")
            assert info.preprocessing.decoder == "nvjpeg"
            assert info.summary.identity.fingerprint != MANIFEST.fingerprint()
            options = {"layers": "features", "cache": "off"}
            got = client.extract(inputs, "lite0_nvjpeg", **options)
            pillow = client.extract(inputs, "efficientnet_lite0", **options)
            assert client.check_consistency("lite0_nvjpeg").passed
        vectors.append(got.array)
        a, b = got.array, pillow.array
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert (cosine > 0.99).all(), cosine  # other pixels, by about a level: the same photo
    np.testing.assert_array_equal(vectors[0], vectors[1])
