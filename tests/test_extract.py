"""End to end through a real server: Extract, ExtractStream, models, health, reflection."""

from __future__ import annotations

import io
import threading

import grpc
import numpy as np
import pytest
import torch
from helpers import CAT_CLASSES, ESPRESSO, assert_close, encode
from PIL import Image

from embedwarden.client import Client, InvalidArgument
from embedwarden.server import build_registry
from embedwarden.server.backbones._efficientnet_lite import efficientnet_lite0
from embedwarden.server.models._weights import read_verified

MODEL = "efficientnet_lite0"


def direct_features(jpeg: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The same weights and preprocessing, written out by hand, run in-process."""
    manifest = build_registry().resolve(MODEL)
    model = efficientnet_lite0()
    model.load_state_dict(torch.load(io.BytesIO(read_verified(manifest)[1]), weights_only=True))
    model.eval()
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    c = int(224 / 256 * min(w, h))
    top, left = (h - c + 1) // 2, (w - c + 1) // 2
    image = image.crop((left, top, left + c, top + c)).resize((224, 224), Image.BICUBIC)
    x = (np.asarray(image, np.float32) - 127) / 128
    with torch.inference_mode():
        t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
        feats = model._head_act(model._bn1(model._conv_head(_blocks(model, t))))
        return feats.mean(dim=(2, 3))[0].numpy(), model(t)[0].numpy()


def _blocks(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model._stem_act(model._bn0(model._conv_stem(x)))
    for block in model._blocks:
        x = block(x)
    return x


def test_features_match_a_direct_in_process_run(client, photos):
    result = client.extract(
        [photos["chelsea"]], MODEL, layers=["features", "logits"], pooling="avg", cache="off"
    )
    features, _logits = direct_features(photos["chelsea"])
    assert result["features"].shape == (1, 1280) and result["features"].dtype == np.float32
    # max|d|/max|ref| measured 9.5e-8 (AVX-512) .. 6.4e-7 (AVX2), 6.7e-7 (no SIMD); 10x margin
    assert_close(result["features"][0], features, rel=1e-5, what="features")
    assert result.layouts == {"features": "C", "logits": "C"}


def test_logits_rank_cats_and_espresso(client, photos):
    result = client.extract([photos["chelsea"], photos["coffee"]], MODEL, layers="logits")
    assert set(np.argsort(result.array[0])[::-1][:3].tolist()) <= CAT_CLASSES
    assert int(np.argmax(result.array[1])) == ESPRESSO


def test_response_names_the_exact_version_and_fingerprint(client, photos):
    manifest = build_registry().resolve(MODEL)
    result = client.extract([photos["coffee"]], MODEL)
    assert (result.model.name, result.model.version) == (MODEL, "1")
    assert result.model.fingerprint == manifest.fingerprint()
    assert result.model.weights_sha256 == manifest.weights.sha256
    assert set(result.timings) == {"cache", "queue", "preprocess", "inference", "total"}
    assert result.timings["total"] > 0


def test_items_come_back_in_input_order(client, photos):
    names = ["rocket", "chelsea", "astronaut", "coffee", "chelsea"]
    batch = client.extract([photos[n] for n in names], MODEL, cache="off").array
    # Batch composition: 0 measured here on AVX-512, AVX2 and 1 or 2 threads; the same model
    # in-process moves by up to 1.8e-6 of max|ref| (AVX2, batch of 16); 10x margin.
    for i, name in enumerate(names):
        single = client.extract([photos[name]], MODEL, cache="off").array[0]
        assert_close(batch[i], single, rel=2e-5, what=f"{i}: {name}")
    # Same input, other position in the batch: oneDNN's blocking may differ by a few ulp.
    assert_close(batch[1], batch[4], rel=2e-5, what="positions 1 and 4")


def test_pooling_dtype_and_normalisation(client, photos):
    jpeg = [photos["astronaut"]]
    full = client.extract(jpeg, MODEL, layers="features", pooling="none", cache="off")
    assert full.array.shape == (1, 1280, 7, 7) and full.layouts["features"] == "CHW"
    avg = client.extract(jpeg, MODEL, layers="features", pooling="avg", cache="off").array
    mx = client.extract(jpeg, MODEL, layers="features", pooling="max", cache="off").array
    # The same float32 mean of 49 values: 0 measured on every path; 1e-6 is ~8 ulp of the max.
    assert_close(avg[0], full.array[0].mean(axis=(1, 2)), rel=1e-6, what="avg")
    np.testing.assert_array_equal(mx[0], full.array[0].max(axis=(1, 2)))
    half = client.extract(jpeg, MODEL, dtype="float16", normalize=True, cache="off").array
    assert half.dtype == np.float16
    # A unit vector: |norm - 1| measured 2.1e-5 .. 2.2e-5 (AVX-512, AVX2), float16 rounding.
    assert abs(float(np.linalg.norm(half[0].astype(np.float32))) - 1) < 1e-3
    # float16 rounds each value by at most 2^-11 = 4.9e-4 of itself: measured 3.4e-4 of max|ref|
    # on every path (deterministic rounding, not SIMD spread); 2x the bound.
    assert_close(half[0], avg[0] / np.linalg.norm(avg[0]), rel=1e-3, what="float16")
    logits = client.extract(jpeg, MODEL, layers="logits", cache="off")  # default: none
    assert logits.array.shape == (1, 1000)
    pooled_logits = client.extract(jpeg, MODEL, layers="logits", pooling="avg", cache="off")
    np.testing.assert_array_equal(pooled_logits.array, logits.array)  # nothing to pool
    with pytest.raises(InvalidArgument, match="cannot be pooled with 'cls'"):
        client.extract(jpeg, MODEL, layers="features", pooling="cls")


def test_raw_arrays_and_lossless_encodings_agree(client, photo_arrays):
    array = photo_arrays["coffee"]
    raw = client.extract([array], MODEL, cache="off").array
    png = client.extract([encode(array, "PNG")], MODEL, cache="off").array
    np.testing.assert_array_equal(raw, png)


def test_concurrent_clients_get_the_vectors_they_would_get_alone(server, photos):
    names = sorted(photos)
    with Client(server.address) as c:
        alone = {n: c.extract([photos[n]], MODEL, cache="off").array[0] for n in names}
    results: dict[tuple[int, str], np.ndarray] = {}

    def worker(k: int) -> None:
        with Client(server.address) as c:
            for n in names:
                results[(k, n)] = c.extract([photos[n]], MODEL, cache="off").array[0]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, n), vec in results.items():  # batch composition, as in test_items_come_back_...
        assert_close(vec, alone[n], rel=2e-5, what=n)


def test_stream_answers_every_message_in_order_and_survives_a_bad_one(client, photos):
    images = [photos[n] for n in ("chelsea", "coffee", "rocket", "astronaut", "coffee")]
    chunks = list(client.extract_stream(images, MODEL, batch_size=2, cache="off"))
    assert [len(c.array) for c in chunks] == [2, 2, 1]
    stacked = np.concatenate([c.array for c in chunks])
    unary = client.extract(images, MODEL, cache="off").array
    assert_close(stacked, unary, rel=2e-5, what="stream vs unary")  # batch composition, as above

    from embedwarden.v1 import embedding_pb2, embedding_pb2_grpc, types_pb2

    def requests():
        for i, data in enumerate([photos["coffee"], b"garbage", photos["chelsea"]]):
            yield embedding_pb2.ExtractStreamRequest(
                request_id=f"r{i}",
                request=embedding_pb2.ExtractRequest(
                    model=types_pb2.ModelRef(name=MODEL), inputs=[types_pb2.Input(encoded=data)]
                ),
            )

    with grpc.insecure_channel(client.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        responses = list(stub.ExtractStream(requests(), timeout=60))
    assert [r.request_id for r in responses] == ["r0", "r1", "r2"]
    assert responses[0].HasField("response") and responses[2].HasField("response")
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "could not identify" in responses[1].error.message


def test_models_describe_health_and_reflection(client, server):
    models = client.list_models()
    default = next(m for m in models if m.identity.name == MODEL)
    assert default.is_default_version and default.default_layer == "features"
    info = client.describe_model(MODEL)
    assert info.summary.identity.version == "1"
    assert {layer.name for layer in info.layers} >= {"stem", "features", "logits", "blocks.15"}
    assert info.preprocessing.interpolation == "bicubic" and info.preprocessing.size == 224
    assert "sha256" in info.manifest
    assert client.health() == "SERVING"
    assert client.health("embedwarden.v1.EmbeddingService") == "SERVING"
    assert client.health(f"model:{MODEL}@1") == "SERVING"

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in response.list_services_response.service}
    assert {
        "embedwarden.v1.EmbeddingService",
        "embedwarden.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names
