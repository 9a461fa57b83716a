"""The templated wire encoding of ExtractResponse items equals a field-by-field build."""

from __future__ import annotations

import numpy as np
import pytest

from embedwarden.server.rpc._wire import encode_items, item_message
from embedwarden.server.serving._extraction import Embedding
from embedwarden.v1 import embedding_pb2


def reference(items: list[list[Embedding]]) -> embedding_pb2.ExtractResponse:
    return embedding_pb2.ExtractResponse(items=[item_message(row) for row in items])


def templated(items: list[list[Embedding]]) -> embedding_pb2.ExtractResponse:
    response = embedding_pb2.ExtractResponse()
    response.MergeFromString(encode_items(items))
    return response


def test_many_items_of_one_shape_and_a_mixed_tail() -> None:
    rng = np.random.default_rng(0)
    items = [
        [
            Embedding("features", rng.standard_normal(1280).astype(np.float32), "C", i % 3 == 0),
            Embedding("blocks.3", rng.standard_normal((40, 7, 7)).astype(np.float16), "CHW", False),
        ]
        for i in range(40)
    ]
    items.append([Embedding("logits", rng.standard_normal(1000).astype(np.float32), "C", True)])
    got = templated(items)
    assert got == reference(items)
    first = got.items[0].embeddings[1].embedding
    assert list(first.shape) == [40, 7, 7]
    assert np.array_equal(np.frombuffer(first.data, "<f2").reshape(40, 7, 7), items[0][1].array)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(3, dtype=np.float32),  # too short for a placeholder: built field by field
        np.arange(64, dtype=">f4"),  # big-endian: sent little-endian
        np.arange(64, dtype=np.float32).reshape(8, 8).T,  # not C-contiguous: sent in C order
        np.zeros((0, 4), dtype=np.float32),  # empty
    ],
    ids=["short", "big-endian", "transposed", "empty"],
)
def test_unusual_arrays_match_the_reference(array: np.ndarray) -> None:
    items = [[Embedding("x", array, "C", False)], [Embedding("x", array, "C", False)]]
    got = templated(items)
    assert got == reference(items)
    sent = got.items[1].embeddings[0].embedding
    assert np.array_equal(np.frombuffer(sent.data, "<f4").reshape(array.shape), array)


def test_payload_bytes_that_look_like_the_template_are_kept_verbatim() -> None:
    # Data equal to protobuf framing bytes must not confuse the splice.
    framing = np.frombuffer(bytes(range(0x08, 0x28)) * 4, dtype=np.float32).copy()
    items = [[Embedding("features", framing, "C", True)] for _ in range(3)]
    assert templated(items) == reference(items)


def test_single_item_responses_reuse_a_template_across_calls() -> None:
    # Each response holds one item; from the second call on its shape's template is reused,
    # and every call must still carry its own data.
    rng = np.random.default_rng(1)
    for _ in range(4):
        items = [[Embedding("pooled", rng.standard_normal(384).astype(np.float32), "C", True)]]
        assert templated(items) == reference(items)


def test_the_head_goes_first_and_the_whole_parses_as_one_response() -> None:
    rng = np.random.default_rng(1)
    items = [[Embedding("features", rng.standard_normal(64).astype(np.float32), "C", True)]] * 3
    head = embedding_pb2.ExtractResponse(timings=embedding_pb2.Timings(total_seconds=0.25))
    got = embedding_pb2.ExtractResponse.FromString(encode_items(items, head.SerializeToString()))
    want = reference(items)
    want.timings.total_seconds = 0.25
    assert got == want
