"""Bad-input battery: hypothesis builds malformed requests for every RPC straight from the proto
descriptors; each must get a deliberate status code (never INTERNAL/UNKNOWN), and the server
must answer a normal request right after."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from helpers import encode, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedwarden.server.testing import ServerThread
from embedwarden.v1 import admin_pb2, embedding_pb2, embedding_pb2_grpc, index_pb2, types_pb2

MODEL = "efficientnet_lite0"
SERVICES = [
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    index_pb2.DESCRIPTOR.services_by_name["IndexService"],
]
# RPCs whose success changes what the others see: never aim them at the real model.
DESTRUCTIVE = {"UnloadModel", "PurgeCache", "DeleteCollection"}
EXPENSIVE = {"CheckConsistency", "CompareModels"}
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
TRIED: Counter[str] = Counter()


def _valid_jpeg() -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    return encode(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


JPEG = _valid_jpeg()


def _scalar(field: _d.FieldDescriptor, safe_names: bool) -> st.SearchStrategy[Any]:
    t = field.type
    if t == _d.FieldDescriptor.TYPE_STRING:
        names = ["", "nope", "a" * 300, "../../etc/passwd", "x@y@z", "é\u0000"]
        if not safe_names:
            names += [MODEL, f"{MODEL}@1", "1", "features", "logits", "stem"]
        return st.sampled_from(names) | st.text(max_size=40)
    if t == _d.FieldDescriptor.TYPE_BYTES:
        return st.sampled_from([b"", JPEG, JPEG[:100], b"\x89PNG\r\n\x1a\n"]) | st.binary(
            max_size=256
        )
    if t == _d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == _d.FieldDescriptor.TYPE_ENUM:
        return st.integers(min_value=-3, max_value=12)  # unknown values included
    if t in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t in (_d.FieldDescriptor.TYPE_UINT32, _d.FieldDescriptor.TYPE_FIXED32):
        return st.sampled_from([0, 1, 3, 224, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
    if t in (_d.FieldDescriptor.TYPE_UINT64, _d.FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (_d.FieldDescriptor.TYPE_INT32, _d.FieldDescriptor.TYPE_SINT32):
        return st.integers(-(2**31), 2**31 - 1)
    return st.sampled_from([-1, 0, 1, 3, 224, 2**40]) | st.integers(-(2**63), 2**63 - 1)


def message_strategy(desc: _d.Descriptor, safe_names: bool, depth: int = 0) -> Any:
    cls = message_factory.GetMessageClass(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.type == _d.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = message_strategy(field.message_type, safe_names, depth + 1)
        else:
            value = _scalar(field, safe_names)
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = value

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        chosen = draw(
            st.sets(st.sampled_from(sorted(fields)), max_size=len(fields))
            if fields
            else st.just(set())
        )
        message = cls()
        for name in sorted(chosen):
            value = draw(fields[name])
            field = desc.fields_by_name[name]
            is_message = field.type == _d.FieldDescriptor.TYPE_MESSAGE
            if field.is_repeated and is_message:
                for item in value:
                    getattr(message, name).add().CopyFrom(item)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            elif is_message:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    thread = ServerThread(
        make_settings(
            tmp_path_factory.mktemp("fuzz"), max_inputs_per_request=8, max_image_pixels=4_000_000
        )
    )
    thread.start()
    channel = grpc.insecure_channel(thread.address)
    yield thread, channel
    channel.close()
    thread.stop()
    print("\nrequests tried per RPC:", dict(sorted(TRIED.items())))


def _call(
    channel: grpc.Channel, service: _d.ServiceDescriptor, method: _d.MethodDescriptor, request: Any
) -> grpc.StatusCode:
    path = f"/{service.full_name}/{method.name}"
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(
                path,
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            list(call(iter(request), timeout=60))
        else:
            call = channel.unary_unary(
                path,
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            call(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


METHODS = [(s, m) for s in SERVICES for m in s.methods]


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[m.name for _, m in METHODS])
def test_malformed_requests_get_deliberate_codes(fuzz_server, service, method):
    _, channel = fuzz_server
    strategy = message_strategy(method.input_type, safe_names=method.name in DESTRUCTIVE)
    if method.client_streaming:
        strategy = st.lists(strategy, min_size=0, max_size=3)
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

    # Checks and parity reports run the models over every canary: a few examples are enough.
    examples = 5 if method.name in EXPENSIVE else 25

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=strategy)
    def check(request: Any) -> None:
        TRIED[method.name] += 1
        code = _call(channel, service, method, request)
        assert code in ALLOWED, f"{method.name} answered {code} to {request!r:.300}"

    check()
    # The server still serves a normal request.
    ok = stub.Extract(
        embedding_pb2.ExtractRequest(
            model=types_pb2.ModelRef(name=MODEL), inputs=[types_pb2.Input(encoded=JPEG)]
        ),
        timeout=60,
    )
    assert len(ok.items) == 1
