"""numpy <-> `embedwarden.v1.Tensor` (raw little-endian bytes + shape + dtype), without copies
where the layout allows. Shared by the client and the server."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedwarden.v1 import types_pb2

_TO_NUMPY: dict[types_pb2.DType.ValueType, np.dtype[Any]] = {
    types_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    types_pb2.DTYPE_UINT8: np.dtype("u1"),
}
_FROM_NUMPY = {v.newbyteorder("="): k for k, v in _TO_NUMPY.items()}
DTYPE_NAMES = {
    types_pb2.DTYPE_FLOAT32: "float32",
    types_pb2.DTYPE_FLOAT16: "float16",
    types_pb2.DTYPE_UINT8: "uint8",
}


class TensorError(ValueError):
    """A Tensor message whose bytes, shape and dtype do not agree."""


def wire_layout(array: np.ndarray) -> np.ndarray:
    """The array as a Tensor carries it: C order, little-endian (no copy when it already is)."""
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))


def to_tensor(array: np.ndarray) -> types_pb2.Tensor:
    return fill_tensor(types_pb2.Tensor(), array)


def _wire_dtype(array: np.ndarray) -> types_pb2.DType.ValueType:
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _FROM_NUMPY:
        raise TensorError(f"unsupported dtype {array.dtype}; use float32, float16 or uint8")
    return _FROM_NUMPY[dtype]


def fill_tensor(tensor: types_pb2.Tensor, array: np.ndarray) -> types_pb2.Tensor:
    """Sets `tensor` (e.g. a field of a larger message, in place) to `array`; returns it. In place
    saves the copy that assigning a built Tensor to a field makes (~0.1 ms per 300 KB)."""
    dtype = _wire_dtype(array)
    tensor.data = wire_layout(array).tobytes()
    tensor.shape[:] = array.shape
    tensor.dtype = dtype
    return tensor


def to_array(tensor: types_pb2.Tensor) -> np.ndarray:
    """A read-only view over the message bytes."""
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorError(f"tensor dtype {tensor.dtype} is not float32, float16 or uint8")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor shape {list(shape)} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(tensor.data):
        raise TensorError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs "
            f"{count * dtype.itemsize} bytes, got {len(tensor.data)}"
        )
    array: np.ndarray = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    return array


# --- requests with large tensors, in wire format -----------------------------------------
# Serializing a protobuf message that holds a few hundred KB of tensor bytes cost ~0.7 ms for
# a 64 x 1280 float32 search batch in a client's search loop against ~0.02 ms for the same bytes
# joined from pieces, and a Verify request of 256 vectors and 256 small JPEGs 19 ms against 5
# (AMD EPYC VM; most of it page faults on the fresh memory the encoder writes into, so it
# varies with the process's allocation history). So the client builds such requests as the
# message's small fields, serialized by protobuf, followed by its large fields with the
# arrays' bytes spliced in. Protobuf allows fields in any order, so the result parses to the
# same message (`tests/test_request_wire.py` checks it does).

Pieces = list[bytes | memoryview]

_WIRE_LEN = 2  # wire type of length-delimited fields (bytes, strings, embedded messages)
_TENSOR_DATA = types_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _size(pieces: Pieces) -> int:
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)


def message_field(number: int, pieces: Pieces) -> Pieces:
    """Field `number` holding the embedded message that `pieces` encode."""
    return [_varint(number << 3 | _WIRE_LEN) + _varint(_size(pieces)), *pieces]


def tensor_field(number: int, array: np.ndarray) -> Pieces:
    """Field `number` holding `array` as a Tensor (as `fill_tensor` sets it), the array's bytes
    one piece, uncopied."""
    meta = types_pb2.Tensor(shape=array.shape, dtype=_wire_dtype(array))
    data = wire_layout(array).reshape(-1).data
    head = _varint(_TENSOR_DATA << 3 | _WIRE_LEN) + _varint(data.nbytes)
    return message_field(number, [meta.SerializeToString(), head, data.cast("B")])


def field_number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


def encode(message: Any, *fields: Pieces) -> bytes:
    """`message` serialized, followed by `fields` (from `tensor_field` / `message_field`): the
    wire form of `message` with those fields set too (leave them unset in `message`)."""
    return b"".join([message.SerializeToString(), *(p for f in fields for p in f)])
