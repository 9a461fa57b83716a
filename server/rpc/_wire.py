"""The items of an ExtractResponse in wire format, from templates with the data spliced in.

A batch of 256 cache hits used to spend more time setting protobuf fields one by one than
reading LMDB. Here protobuf itself serializes one item per distinct item shape (layers, layouts,
cached flags, array shapes and dtypes) with random placeholder data; the bytes around the
placeholders are the template, and every item of that shape is the template's pieces with its
arrays' bytes in between. The bytes go out as they are (`_register.Encoded`); `tests/test_wire.py`
checks that they parse equal to a field-by-field build.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedwarden.client.tensor import to_tensor, wire_layout
from embedwarden.v1 import embedding_pb2

from ..serving import Embedding

_SWAPPED = ">" if sys.byteorder == "little" else "="  # byte orders that are not little-endian
MIN_PLACEHOLDER = 16  # shorter data could match template bytes by chance: no template
_UNSEEN: list[bytes] = []  # sentinels in the template table
_SEEN_ONCE: list[bytes] = []
# Templates outlive a request, so that single-item responses use them too (~30 us less per
# cache hit); a server sees few item shapes, and the table starts over if it ever fills.
MAX_TEMPLATES = 1024
_templates: dict[tuple[Any, ...], list[bytes] | None] = {}


def _embedding(e: Embedding, data: bytes | None = None) -> embedding_pb2.LayerEmbedding:
    """One LayerEmbedding; `data` replaces the array's bytes (a template's placeholder)."""
    out = embedding_pb2.LayerEmbedding(
        layer=e.layer, layout=e.layout, cached=e.cached, embedding=to_tensor(e.array)
    )
    if data is not None:
        out.embedding.data = data
    return out


def item_message(row: Sequence[Embedding]) -> embedding_pb2.ExtractItem:
    """One item built field by field (the reference the templates must equal)."""
    return embedding_pb2.ExtractItem(embeddings=[_embedding(e) for e in row])


def _encoded_item(item: embedding_pb2.ExtractItem) -> bytes:
    """`item` as one `items` field of an ExtractResponse (tag, length, bytes)."""
    return embedding_pb2.ExtractResponse(items=[item]).SerializeToString()


def _template(row: Sequence[Embedding]) -> list[bytes] | None:
    """The encoded item split around each embedding's data; None when that cannot be done
    safely (data too short for an unambiguous placeholder). Each placeholder is a random
    16-byte head, found exactly once in the encoding, then zeros up to the data's length."""
    sizes = [e.array.nbytes for e in row]
    if any(n < MIN_PLACEHOLDER for n in sizes):
        return None
    heads = [os.urandom(MIN_PLACEHOLDER) for _ in row]
    item = embedding_pb2.ExtractItem(
        embeddings=[
            _embedding(e, head + bytes(n - len(head)))
            for e, head, n in zip(row, heads, sizes, strict=True)
        ]
    )
    blob = _encoded_item(item)
    pieces = []
    start = 0
    for head, n in zip(heads, sizes, strict=True):
        at = blob.find(head, start)
        if at < 0 or blob.find(head, at + 1) >= 0:
            return None
        pieces.append(blob[start:at])
        start = at + n
    pieces.append(blob[start:])
    return pieces


def _data(array: np.ndarray) -> memoryview:
    if array.flags.c_contiguous and array.dtype.byteorder != _SWAPPED:
        return array.data  # the common case, checked without a call
    return wire_layout(array).data


def encode_items(items: Sequence[Sequence[Embedding]], head: bytes = b"") -> bytes:
    """The `items` fields of an ExtractResponse, in order, in wire format, after `head` (the
    response's other fields, serialized: joined here, so that the data is copied once)."""
    templates = _templates
    if len(templates) > MAX_TEMPLATES:
        templates.clear()
    parts: list[bytes | memoryview] = [head]
    add = parts.append
    for row in items:
        spec = tuple([(e.layer, e.layout, e.cached, e.array.shape, e.array.dtype) for e in row])
        pieces = templates.get(spec, _UNSEEN)
        if pieces is _UNSEEN:  # a template pays off from an item shape's second item on
            templates[spec] = _SEEN_ONCE
            pieces = None
        elif pieces is _SEEN_ONCE:
            pieces = templates[spec] = _template(row)
        if pieces is None:
            add(_encoded_item(item_message(row)))
            continue
        for piece, e in zip(pieces, row, strict=False):  # one piece more than embeddings
            add(piece)
            add(_data(e.array))
        add(pieces[-1])
    return b"".join(parts)
