"""Requests the client builds in wire form (the tensors' bytes spliced in) parse to the very
message a field-by-field build gives."""

from __future__ import annotations

import numpy as np
import pytest

from embedwarden.client.tensor import (
    TensorError,
    encode,
    field_number,
    fill_tensor,
    message_field,
    tensor_field,
    to_array,
    to_tensor,
)
from embedwarden.v1 import embedding_pb2, index_pb2, types_pb2

RNG = np.random.default_rng(0)
ARRAYS = [
    RNG.standard_normal((64, 1280)).astype(np.float32),
    RNG.standard_normal((3, 5)).astype(np.float16),
    RNG.standard_normal((6, 8)).astype(np.float32)[:, ::2],  # not contiguous
    RNG.standard_normal((4, 3)).astype(">f4"),  # big-endian
    np.zeros((0, 16), np.float32),
    RNG.standard_normal((1, 32)).astype(np.float32),  # 128 bytes: a length of two varint bytes
    RNG.standard_normal((1, 50)).astype(np.float32),  # 200 bytes
    RNG.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype.str}{list(a.shape)}")
def test_a_spliced_search_batch_parses_to_the_built_request(array: np.ndarray) -> None:
    head = index_pb2.SearchRequest(collection="c", k=10, fingerprint="ab" * 32, packed=True)
    payload = encode(head, tensor_field(field_number(head, "vectors"), array))
    built = index_pb2.SearchRequest()
    built.CopyFrom(head)
    fill_tensor(built.vectors, array)
    parsed = index_pb2.SearchRequest.FromString(payload)
    assert parsed == built
    np.testing.assert_array_equal(to_array(parsed.vectors), array)


def test_spliced_verify_inputs_and_vectors_keep_their_order() -> None:
    images = [bytes([i]) * (100 + i) for i in range(5)]
    rows = [RNG.standard_normal(1280).astype(np.float32) for _ in range(4)]
    rows.append(RNG.standard_normal((40, 7, 7)).astype(np.float16))
    head = embedding_pb2.VerifyRequest(layer="features", pipeline="phone", skip_diagnosis=True)
    inputs = [types_pb2.Input(encoded=i) for i in images]
    payload = encode(
        head,
        *(message_field(field_number(head, "inputs"), [i.SerializeToString()]) for i in inputs),
        *(tensor_field(field_number(head, "vectors"), v) for v in rows),
    )
    built = embedding_pb2.VerifyRequest()
    built.CopyFrom(head)
    built.inputs.extend(inputs)
    built.vectors.extend(to_tensor(v) for v in rows)
    assert embedding_pb2.VerifyRequest.FromString(payload) == built


def test_nested_message_fields_parse_like_built_items() -> None:
    matrix = RNG.standard_normal((300, 64)).astype(np.float32)  # lengths past one varint byte
    head = index_pb2.UpsertRequest(collection="c", fingerprint="f")
    vector = field_number(index_pb2.UpsertItem, "vector")
    items = [
        message_field(
            field_number(head, "items"),
            [index_pb2.UpsertItem(id=f"v{i}").SerializeToString(), *tensor_field(vector, row)],
        )
        for i, row in enumerate(matrix)
    ]
    built = index_pb2.UpsertRequest()
    built.CopyFrom(head)
    built.items.extend(
        index_pb2.UpsertItem(id=f"v{i}", vector=to_tensor(row)) for i, row in enumerate(matrix)
    )
    assert index_pb2.UpsertRequest.FromString(encode(head, *items)) == built


def test_an_unsupported_dtype_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(TensorError, match="unsupported dtype int64"):
        tensor_field(6, np.zeros(3, np.int64))
