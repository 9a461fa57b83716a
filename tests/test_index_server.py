"""IndexService through a real server: real photos and their near-duplicates, the CLI, model
binding (fingerprints, loaded versions), limits and error codes, health and reflection."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import encode, make_settings, run_cli

from embedwarden.client import (
    AlreadyExists,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from embedwarden.server._metrics import METRICS
from embedwarden.server.testing import ServerThread

MODEL = "efficientnet_lite0"
ORIGINALS = (
    "chelsea",
    "coffee",
    "rocket",
    "astronaut",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "coins",
    "moon",
    "brick",
    "grass",
    "stereo_motorcycle",
)


def _rgb(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    image = image[0] if isinstance(image, tuple) else image
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _resized(image: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    size = (int(w * factor), int(h * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory):
    """Twelve unrelated photos (JPEG q90) plus near-duplicates of chelsea and coffee: a half-size
    copy and a copy re-encoded at JPEG quality 40 (chelsea also as PNG)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ORIGINALS:
        (folder / f"{name}.jpg").write_bytes(encode(_rgb(name), "JPEG", quality=90))
    dups = folder / "copies"
    dups.mkdir()
    for name in ("chelsea", "coffee"):
        image = _rgb(name)
        (dups / f"{name}-half.jpg").write_bytes(encode(_resized(image, 0.5), "JPEG", quality=90))
        (dups / f"{name}-q40.jpg").write_bytes(encode(image, "JPEG", quality=40))
    (dups / "chelsea-png.png").write_bytes(encode(_rgb("chelsea"), "PNG"))
    return folder


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server with no model loaded (collections of vectors only)."""
    with ServerThread(make_settings(tmp_path_factory.mktemp("bare"), models=())) as thread:
        yield thread


@pytest.fixture()
def bare(bare_server: ServerThread) -> Iterator[Client]:
    with Client(bare_server.address, timeout=60) as c:
        yield c


def test_cli_indexes_photos_and_finds_near_duplicates(server, photo_folder):
    common = ("--server", server.address, "index")
    made = run_cli(*common, "create", "photos", "--model", MODEL, "--kind", "flat")
    assert made.returncode == 0, made.stderr
    assert "efficientnet_lite0@1" in made.stdout and "features" in made.stdout
    added = run_cli(*common, "add", "photos", str(photo_folder), "--ids-from", "stem")
    assert added.returncode == 0, added.stderr
    assert "17/17" in added.stderr and "17 added" in added.stderr  # progress bar and summary

    for name, copies in (
        ("chelsea", {"chelsea-half", "chelsea-q40", "chelsea-png"}),
        ("coffee", {"coffee-half", "coffee-q40"}),
    ):
        query = str(photo_folder / f"{name}.jpg")
        found = run_cli(*common, "search", "photos", query, "-k", "17", "--json")
        assert found.returncode == 0, found.stderr
        result = json.loads(found.stdout)
        hits = result["hits"]
        # Cosine of a unit vector with itself (absolute = relative): |1 - score| measured
        # <= 2.4e-7 with faiss' AVX-512 and AVX2 kernels.
        assert hits[0]["id"] == name and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        near = {h["id"] for h in hits[1 : 1 + len(copies)]}
        assert near == copies, hits  # every copy above every unrelated photo
        unrelated = [h["score"] for h in hits[1 + len(copies) :]]
        assert min(h["score"] for h in hits[1 : 1 + len(copies)]) > max(unrelated)
        assert result["model"]["fingerprint"] and len(hits) == 17

    table = run_cli(*common, "search", "photos", str(photo_folder / "rocket.jpg"), "-k", "3")
    assert table.stdout.splitlines()[1].split()[-1] == "rocket"
    listing = run_cli(*common, "list")
    assert "photos" in listing.stdout and "17" in listing.stdout
    described = json.loads(run_cli(*common, "describe", "photos", "--json").stdout)
    assert described["size"] == 17 and described["dimension"] == 1280
    removed = run_cli(*common, "remove", "photos", "chelsea-png", "nope", check=False)
    assert "1 removed, 1 not found" in removed.stderr
    assert run_cli(*common, "drop", "photos").returncode == 0
    missing = run_cli(*common, "describe", "photos", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("kind", ["hnsw", "ivf_flat"])
def test_approximate_kinds_rank_photos_like_exact_search(client, photo_folder, kind):
    files = sorted(photo_folder.rglob("*.*"))
    ids = [f.stem for f in files]
    params = {"ivf_nlist": 2, "train_min_vectors": 10} if kind == "ivf_flat" else {}
    client.create_collection(f"photos-{kind}", MODEL, kind=kind, **params)
    client.upsert(f"photos-{kind}", ids, images=[f.read_bytes() for f in files])
    deadline = time.monotonic() + 60
    while not client.describe_collection(f"photos-{kind}").trained:  # IVF: trains in background
        assert time.monotonic() < deadline
        time.sleep(0.05)
    nprobe = 2 if params else 0
    results = client.search(f"photos-{kind}", ids=["chelsea", "coffee"], k=4, nprobe=nprobe)
    assert [h.id for h in results[0][:1]] == ["chelsea"]
    assert {h.id for h in results[0][1:4]} == {"chelsea-half", "chelsea-q40", "chelsea-png"}
    assert results[1][0].id == "coffee"
    assert {h.id for h in results[1][1:3]} == {"coffee-half", "coffee-q40"}
    info = client.describe_collection(f"photos-{kind}")
    assert info.size == len(files) and info.kind == kind
    client.delete_collection(f"photos-{kind}")


def test_vectors_from_extract_round_trip_with_their_fingerprint(client, photos):
    extraction = client.extract(list(photos.values()), MODEL, cache="off")
    fingerprint = extraction.model.fingerprint
    info = client.create_collection("vecs", MODEL, metric="l2")
    assert info.fingerprint == fingerprint and info.metric == "l2"
    result = client.upsert("vecs", list(photos), extraction.array, fingerprint=fingerprint)
    assert (result.inserted, result.replaced) == (len(photos), 0)
    found = client.search("vecs", extraction.array[:2], k=2, fingerprint=fingerprint)
    assert found.model.fingerprint == fingerprint
    assert [r[0].id for r in found.hits] == list(photos)[:2]
    # Squared L2 distance to itself: faiss computes |x|^2 + |y|^2 - 2xy, whose rounding scales
    # with |x|^2 (243 here): measured 3.8e-7 (AVX-512) .. 5.0e-7 (AVX2) of |x|^2; 10x margin.
    norm2 = (extraction.array.astype(np.float64) ** 2).sum(axis=1)
    assert abs(found[0][0].score) <= 5e-6 * norm2[0]
    # The same images embedded by the server land on the same vectors.
    by_image = client.search("vecs", images=[photos["coffee"]], k=1)
    coffee = list(photos).index("coffee")
    assert by_image[0][0].id == "coffee" and abs(by_image[0][0].score) <= 5e-6 * norm2[coffee]
    again = client.upsert("vecs", ["coffee"], images=[photos["coffee"]])
    assert (again.inserted, again.replaced) == (0, 1)
    assert again.log_sequence == result.log_sequence + 1
    assert METRICS.sample("embedwarden_index_vectors", {"collection": "vecs"}) == len(photos)
    assert METRICS.sample("embedwarden_index_bytes", {"collection": "vecs"}) > 4 * 1280
    client.delete_collection("vecs")
    assert METRICS.sample("embedwarden_index_vectors", {"collection": "vecs"}) is None


def test_vectors_of_another_model_version_are_refused_naming_both(bare):
    info = bare.create_collection("bound", MODEL)
    vectors = np.ones((2, 1280), np.float32)
    other = "0" * 64
    with pytest.raises(FailedPrecondition) as refused:
        bare.upsert("bound", ["a", "b"], vectors, fingerprint=other)
    assert info.fingerprint in refused.value.details and other in refused.value.details
    with pytest.raises(FailedPrecondition, match=other):
        bare.search("bound", vectors, fingerprint=other)
    with pytest.raises(InvalidArgument, match="fingerprint"):
        bare.upsert("bound", ["a", "b"], vectors)  # vectors must say where they come from
    assert bare.describe_collection("bound").size == 0
    bare.delete_collection("bound")


def test_inputs_need_the_collections_model_loaded(bare, photos):
    bare.create_collection("needs-model", MODEL)
    with pytest.raises(FailedPrecondition, match=r"efficientnet_lite0@1.*not loaded"):
        bare.upsert("needs-model", ["cat"], images=[photos["chelsea"]])
    with pytest.raises(FailedPrecondition, match="not loaded"):
        bare.search("needs-model", images=[photos["chelsea"]])
    bare.delete_collection("needs-model")


def test_create_is_idempotent_and_conflicts_are_refused(bare):
    first = bare.create_collection("same", MODEL, kind="hnsw", hnsw_m=16)
    again = bare.create_collection("same", MODEL, kind="hnsw", hnsw_m=16)
    assert again.created_at == first.created_at and again.params["hnsw_m"] == 16
    assert first.params["hnsw_ef_search"] == 64  # defaults are stored with the collection
    with pytest.raises(AlreadyExists, match="another definition"):
        bare.create_collection("same", MODEL, kind="flat")
    assert [c.name for c in bare.list_collections()] == ["same"]
    bare.delete_collection("same")
    with pytest.raises(NotFound):
        bare.delete_collection("same")


@pytest.mark.parametrize(
    ("create", "message"),
    [
        ({"name": "../etc"}, "collection name"),
        ({"name": ""}, "collection name"),
        ({"name": "x" * 65}, "collection name"),
        ({"name": "ok", "kind": "flat", "hnsw_m": 8}, "do not apply"),
        ({"name": "ok", "kind": "ivf_pq", "pq_m": 7}, "must divide"),
        ({"name": "ok", "kind": "ivf_flat", "ivf_nlist": 64, "train_min_vectors": 10}, "below"),
        ({"name": "ok", "kind": "hnsw", "hnsw_m": 1000}, "out of range"),
        ({"name": "ok", "pooling": "none"}, "pool it"),
    ],
)
def test_bad_collections_are_invalid_arguments(bare, create, message):
    args = dict(create)
    name = args.pop("name")
    with pytest.raises(InvalidArgument, match=message):
        bare.create_collection(name, MODEL, **args)


def test_unknown_models_and_layers_are_not_found(bare):
    with pytest.raises(NotFound, match="no layer 'nope'"):
        bare.create_collection("ok", MODEL, layer="nope")
    with pytest.raises(NotFound, match="unknown model"):
        bare.create_collection("ok", "nomodel")


def test_ids_queries_and_k_are_bounded(bare):
    info = bare.create_collection("limits", MODEL)
    fp = info.fingerprint
    one = np.ones((1, 1280), np.float32)
    bad_ids = [("", "empty"), ("a\x00b", "control"), ("x" * 513, "limit is 512")]
    for value, message in bad_ids:
        with pytest.raises(InvalidArgument, match=message):
            bare.upsert("limits", [value], one, fingerprint=fp)
    with pytest.raises(InvalidArgument, match="more than once"):
        bare.upsert("limits", ["a", "a"], np.ones((2, 1280), np.float32), fingerprint=fp)
    with pytest.raises(InvalidArgument, match="shape"):
        bare.upsert("limits", ["a"], np.ones((1, 1000), np.float32), fingerprint=fp)
    with pytest.raises(InvalidArgument, match="NaN"):
        bare.upsert("limits", ["a"], one * np.nan, fingerprint=fp)
    with pytest.raises(InvalidArgument, match="zero vector"):
        bare.upsert("limits", ["a"], one * 0, fingerprint=fp)
    bare.upsert("limits", ["a"], one, fingerprint=fp)
    with pytest.raises(InvalidArgument, match=r"k 1001 is out of range \[1, 1000\]"):
        bare.search("limits", one, k=1001, fingerprint=fp)
    with pytest.raises(InvalidArgument, match="limit is 1024"):
        bare.search("limits", np.ones((1025, 1280), np.float32), fingerprint=fp)
    with pytest.raises(InvalidArgument, match="HNSW"):
        bare.search("limits", one, fingerprint=fp, ef_search=10)
    with pytest.raises(NotFound, match="'zz'"):
        bare.search("limits", ids=["zz"])
    with pytest.raises(NotFound, match="no collection"):
        bare.search("nope", one, fingerprint=fp)
    hits = bare.search("limits", one, fingerprint=fp, k=0)  # 0: the default of 10
    assert [h.id for h in hits[0]] == ["a"]
    bare.delete_collection("limits")


def test_batch_columnar_and_packed_forms_answer_as_the_per_query_form(bare, bare_server):
    from embedwarden.client import SearchResults
    from embedwarden.client.tensor import to_array, to_tensor
    from embedwarden.v1 import index_pb2, index_pb2_grpc, types_pb2

    info = bare.create_collection("forms", MODEL, kind="hnsw")
    fp = info.fingerprint
    rng = np.random.default_rng(5)
    data = rng.standard_normal((300, 1280)).astype(np.float32)
    bare.upsert("forms", [f"v{i}" for i in range(300)], data, fingerprint=fp)
    queries = data[:7] + 0.1 * rng.standard_normal((7, 1280)).astype(np.float32)
    per_query = [index_pb2.Query(vector=to_tensor(q)) for q in queries]
    with grpc.insecure_channel(bare_server.address) as channel:
        stub = index_pb2_grpc.IndexServiceStub(channel)

        def call(**fields):
            fields.setdefault("k", 5)
            request = index_pb2.SearchRequest(collection="forms", fingerprint=fp, **fields)
            return stub.Search(request, timeout=30)

        def search(**fields):
            return call(**fields).results

        hits = [[(h.id, h.score) for h in r.hits] for r in search(queries=per_query)]
        batch = search(vectors=to_tensor(queries), columnar=True)
        assert all(not r.hits for r in batch)
        assert [list(zip(r.ids, r.scores, strict=True)) for r in batch] == hits
        assert [[(h.id, h.score) for h in r.hits] for r in search(vectors=to_tensor(queries))] == (
            hits
        )
        assert [h[0][0] for h in hits] == [f"v{i}" for i in range(7)]
        packed = call(vectors=to_tensor(queries), packed=True)
        assert not packed.results
        assert list(packed.packed.counts) == [5] * 7
        flat = [pair for row in hits for pair in row]
        scores = to_array(packed.packed.scores).tolist()
        assert list(zip(packed.packed.ids, scores, strict=True)) == flat
        # Fewer stored vectors than k: each query's count says where its hits end.
        short = call(vectors=to_tensor(queries), packed=True, k=400)
        counts = list(short.packed.counts)
        assert all(0 < c <= 300 for c in counts) and sum(counts) == len(short.packed.ids)
        by_rows = SearchResults.from_proto(short)
        wide = SearchResults.from_proto(call(vectors=to_tensor(queries), k=400))  # per-query form
        assert by_rows.ids == wide.ids and [len(i) for i in by_rows.ids] == counts
        for a, b in zip(by_rows.scores, wide.scores, strict=True):
            np.testing.assert_array_equal(a, b)
        assert by_rows.hits == wide.hits and by_rows[0][0].id == "v0"
        bad = {
            "not both": {"queries": per_query, "vectors": to_tensor(queries)},
            "`packed` or `columnar`": {
                "vectors": to_tensor(queries),
                "packed": True,
                "columnar": True,
            },
            r"shape \[7, 1000\]": {"vectors": to_tensor(queries[:, :1000])},
            r"shape \[1280\]": {"vectors": to_tensor(queries[0])},
            "float32 or float16": {"vectors": to_tensor(queries.astype(np.uint8))},
            r"vectors\[2\]: vector holds NaN": {
                "vectors": to_tensor(np.where(np.arange(7)[:, None] == 2, np.nan, queries))
            },
            "needs 35840 bytes": {
                "vectors": types_pb2.Tensor(
                    data=b"\0" * 8, shape=[7, 1280], dtype=types_pb2.DTYPE_FLOAT32
                )
            },
        }
        for message, fields in bad.items():
            with pytest.raises(grpc.RpcError) as caught:
                search(**fields)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() is not None
            assert re.search(message, caught.value.details()), message
    assert [h.id for h in bare.search("forms", queries, k=5, fingerprint=fp)[0]] == [
        i for i, _ in hits[0]
    ]  # the client uses the batch and packed forms
    bare.delete_collection("forms")


def test_index_service_is_in_health_and_reflection(bare_server):
    with grpc.insecure_channel(bare_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
    assert "embedwarden.v1.IndexService" in names
    with Client(bare_server.address) as c:
        assert c.health("embedwarden.v1.IndexService") == "SERVING"
