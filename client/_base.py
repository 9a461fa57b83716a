"""`ClientBase`: the channel, credentials, deadlines, retries and error mapping.

Retries: UNAVAILABLE is retried by gRPC itself (service-config retry policy with exponential
backoff), so a server that is restarting or still loading is waited for within the deadline.
Every RPC has a deadline (`timeout`, per call or per client). Errors arrive as the typed
exceptions of `embedwarden.client` (`InvalidArgument`, `NotFound`, ...), never as grpc.RpcError.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedwarden.v1 import admin_pb2_grpc, embedding_pb2_grpc, index_pb2_grpc

from ._exceptions import EmbedwardenError, from_rpc_error

DEFAULT_ADDRESS = "127.0.0.1:50051"


def default_address() -> str:
    return os.environ.get("EMBEDWARDEN_SERVER", DEFAULT_ADDRESS)


def _service_config(retries: int) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [
                        {"service": s}
                        for s in (
                            "embedwarden.v1.EmbeddingService",
                            "embedwarden.v1.AdminService",
                            "embedwarden.v1.IndexService",
                        )
                    ],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(5, retries + 1)),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class ClientBase:
    """Channel, credentials, deadlines and error mapping shared by every API mixin."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 4,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool | None = None,
        server_name: str | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        """`token` (else $EMBEDWARDEN_TOKEN) is sent as a bearer token. TLS is used when
        `root_certificates` is given (or `tls=True` for the system roots); `certificate_chain` and
        `private_key` add a client certificate (mutual TLS); `server_name` overrides the name
        checked against the server certificate."""
        self.address = address or default_address()
        self.timeout = timeout
        token = token if token is not None else os.environ.get("EMBEDWARDEN_TOKEN")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(retries)),
        ]
        use_tls = tls if tls is not None else root_certificates is not None
        if use_tls:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            self._channel = grpc.secure_channel(self.address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._index = index_pb2_grpc.IndexServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._encoded_methods: dict[str, Callable[..., Any]] = {}

    # --- plumbing ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _encoded(self, service: Any, method: str, response: Any) -> Callable[..., Any]:
        """`method` of `service` (a ServiceDescriptor) taking a request already in wire form
        (`tensor.encode`), for `_call`; `response`: the response message class."""
        path = f"/{service.full_name}/{method}"
        call = self._encoded_methods.get(path)
        if call is None:
            call = self._encoded_methods[path] = self._channel.unary_unary(
                path, request_serializer=None, response_deserializer=response.FromString
            )
        return call

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # --- health -----------------------------------------------------------------------

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN' or 'UNKNOWN'."""
        response = self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float = 300.0, service: str = "") -> None:
        """Blocks until the health service reports SERVING (e.g. models loaded and checked)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.health(service) == "SERVING":
                    return
            except EmbedwardenError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last: {last})")
