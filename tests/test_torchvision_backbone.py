"""torchvision models: manifest from the weights entry, weights from the (offline) hub cache,
intermediate layers through create_feature_extractor, eval mode, no in-place overwrites."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_close, seeded_torchvision_weights
from PIL import Image

from embedwarden.server import WeightsVerificationError, parse_manifest
from embedwarden.server.backbones._torch import TorchBackbone
from embedwarden.server.backbones._torchvision_manifest import torchvision_manifest
from embedwarden.server.models import RECOMMENDED_DECODE
from embedwarden.server.models._preprocess import Preprocessor
from embedwarden.server.models._weights import read_verified


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(home))
    path = seeded_torchvision_weights(home, "resnet18", "IMAGENET1K_V1", seed=1)
    manifest = parse_manifest(torchvision_manifest("resnet18", "IMAGENET1K_V1"))
    _, data = read_verified(manifest)
    yield manifest, TorchBackbone(manifest, data, "cpu"), path
    mp.undo()


def test_manifest_is_written_from_the_weights_entry(resnet18):
    manifest, _, path = resnet18
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    p = manifest.preprocess
    assert (p.resize_size, p.size) == (transform.resize_size[0], transform.crop_size[0])
    assert p.interpolation == "bilinear" and p.antialias
    assert p.mean == tuple(transform.mean) and p.std == tuple(transform.std)
    assert manifest.weights.file == path.name == "resnet18-f37072fd.pth"
    assert manifest.default_layer == "flatten"
    # Every decode field written out, with the recommended contract (upright, sRGB, ...).
    assert manifest.preprocess.decode == RECOMMENDED_DECODE
    assert "[decode]" in manifest.text
    assert manifest.layer("layer4.1").shape == (512, 7, 7)
    assert manifest.layer("logits").shape == (1000,)


def test_layers_match_a_direct_run_of_the_same_weights(resnet18, photo_arrays):
    manifest, backbone, path = resnet18
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    image = Image.fromarray(photo_arrays["chelsea"])
    reference_input = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(image)
    with torch.inference_mode():
        reference = model(reference_input[None]).numpy()
    ours = backbone.infer(Preprocessor(manifest.preprocess)(image)[None], ["logits", "flatten"])
    # max|d|/max|ref| measured 3.2e-7 (AVX-512) .. 3.7e-7 (AVX2), 4.1e-7 (no SIMD); 10x margin
    assert_close(ours["logits"], reference, rel=5e-6, what="logits")
    assert ours["flatten"].shape == (1, 512)


def test_in_place_relu_does_not_overwrite_a_tapped_batchnorm(resnet18, photo_arrays):
    manifest, backbone, _ = resnet18
    x = Preprocessor(manifest.preprocess)(Image.fromarray(photo_arrays["coffee"]))[None]
    out = backbone.infer(x, ["bn1", "relu"])
    assert (out["bn1"] < 0).any(), "bn1 was overwritten by the in-place ReLU after it"
    np.testing.assert_array_equal(out["relu"], np.maximum(out["bn1"], 0))


def test_inference_leaves_weights_and_buffers_unchanged(resnet18):
    _manifest, backbone, _ = resnet18
    before = backbone.state_checksum()
    backbone.infer(
        np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32),
        ["layer2.0", "logits"],
    )
    assert backbone.training_modules() == []
    assert backbone.state_checksum() == before


def test_batchnorm_in_training_mode_is_seen(resnet18):
    _manifest, backbone, _ = resnet18
    x = np.ones((2, 3, 224, 224), np.float32)
    backbone.infer(x, ["layer1.0"])  # the extractor exists before the fault
    before = backbone.state_checksum()
    backbone.set_training("layer1.0.bn1", True)
    try:
        assert backbone.training_modules() and "layer1.0.bn1" in backbone.training_modules()
        backbone.infer(x, ["layer1.0"])
        assert backbone.state_checksum() != before  # running stats moved: a mutation
    finally:
        backbone.set_training("layer1.0.bn1", False)


def test_cpu_passes_run_through_a_trace_identical_to_the_eager_extractor(resnet18):
    _manifest, backbone, _ = resnet18
    layers = ("layer3.1", "logits")
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        first = backbone.infer(x, layers)  # eager, then traced and checked against it
        key = (layers, x.shape, torch.float32)
        assert backbone._traces[key] is not None, "the trace was refused"
        served = backbone.infer(x, layers)  # through the trace
        with torch.inference_mode():
            xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            eager = backbone._extractor(layers)(xt)
        for name in layers:
            np.testing.assert_array_equal(served[name], first[name])
            np.testing.assert_array_equal(served[name], eager[name].numpy())


def test_lanes_meeting_a_new_shape_together_trace_it_once(resnet18, monkeypatch):
    """A trace costs ~0.4 s of CPU; the lane that meets a shape second serves it eagerly
    instead of tracing it again."""
    _manifest, backbone, _ = resnet18
    traced = []
    real_trace = torch.jit.trace

    def counting_trace(*args, **kwargs):
        traced.append(threading.get_ident())
        return real_trace(*args, **kwargs)

    rng = np.random.default_rng(5)
    backbone.infer(rng.standard_normal((1, 3, 64, 64)).astype(np.float32), ["layer2.0"])
    monkeypatch.setattr(torch.jit, "trace", counting_trace)  # the extractor exists now
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    start = threading.Barrier(2)
    served: list[dict[str, np.ndarray]] = []

    def lane() -> None:
        start.wait()
        served.append(backbone.infer(x, ["layer2.0"], threads=1))  # on this thread, as lanes

    lanes = [threading.Thread(target=lane) for _ in range(2)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    assert len(traced) == 1
    assert backbone._traces[(("layer2.0",), x.shape, torch.float32)] is not None
    np.testing.assert_array_equal(served[0]["layer2.0"], served[1]["layer2.0"])


def test_a_module_in_training_mode_turns_traces_off_until_it_is_back(resnet18):
    _manifest, backbone, _ = resnet18
    x = np.ones((1, 3, 224, 224), np.float32)
    backbone.infer(x, ["layer1.0"])
    assert backbone._traces
    backbone.set_training("layer1.0.bn1", True)
    try:
        assert not backbone._traces
        backbone.infer(x, ["layer1.0"])
        assert not backbone._traces, "a trace would bake the eval-mode BatchNorm in"
    finally:
        backbone.set_training("layer1.0.bn1", False)
    backbone.infer(x, ["layer1.0"])
    assert backbone._traces


def test_a_different_file_under_the_same_name_refuses_to_load(resnet18, tmp_path):
    manifest, _, path = resnet18
    seeded_torchvision_weights(tmp_path, "resnet18", "IMAGENET1K_V1", seed=2)
    other = tmp_path / "hub" / "checkpoints" / path.name
    text = manifest.text.replace(
        'format = "torch_state_dict"', f'format = "torch_state_dict"\npath = "{other.parent}"'
    )
    with pytest.raises(WeightsVerificationError, match="refusing to load"):
        read_verified(parse_manifest(text))
