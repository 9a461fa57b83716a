"""Who may call what: listening policy, TLS credentials, bearer tokens with roles.

Policy: on loopback the server may run in plaintext without tokens (the README's first command just
works). Any other address needs TLS (certificate and key; client certificates for mutual TLS when
a CA is given) and a tokens file, unless `--insecure` is given explicitly, which is logged as a
warning at every start.

Tokens file (TOML), tokens stored as SHA-256 hex, never in the clear:

    [[tokens]]
    name = "trainer-a"
    sha256 = "<sha256 hex of the token>"
    role = "reader"        # reader | writer | admin

`embedwarden token new --name N --role R --tokens-file F` creates a token, prints it once and
appends its hash. Roles nest: reader (extract, search, describe, list, stats) < writer (also
upsert, remove, collections) < admin (also load/unload models, purge the cache, run checks and
parity reports). Health checks and reflection stay open.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import grpc

from .._errors import (
    EmbedwardenError,
    FailedPrecondition,
    ManifestError,
    PermissionDenied,
    Unauthenticated,
)
from .._metrics import METRICS
from .._settings import Settings
from ._status import status_for

log = logging.getLogger(__name__)


class Role(IntEnum):
    READER = 1
    WRITER = 2
    ADMIN = 3


# The role each RPC needs; RPCs not listed (health, reflection) are open.
REQUIRED_ROLE: dict[str, Role] = {
    "/embedwarden.v1.EmbeddingService/Extract": Role.READER,
    "/embedwarden.v1.EmbeddingService/ExtractStream": Role.READER,
    "/embedwarden.v1.EmbeddingService/ListModels": Role.READER,
    "/embedwarden.v1.EmbeddingService/DescribeModel": Role.READER,
    "/embedwarden.v1.EmbeddingService/Ping": Role.READER,
    "/embedwarden.v1.EmbeddingService/Verify": Role.READER,
    "/embedwarden.v1.IndexService/Search": Role.READER,
    "/embedwarden.v1.IndexService/ListCollections": Role.READER,
    "/embedwarden.v1.IndexService/DescribeCollection": Role.READER,
    "/embedwarden.v1.AdminService/GetCacheStats": Role.READER,
    "/embedwarden.v1.IndexService/Upsert": Role.WRITER,
    "/embedwarden.v1.IndexService/Remove": Role.WRITER,
    "/embedwarden.v1.IndexService/CreateCollection": Role.WRITER,
    "/embedwarden.v1.IndexService/DeleteCollection": Role.WRITER,
    "/embedwarden.v1.AdminService/LoadModel": Role.ADMIN,
    "/embedwarden.v1.AdminService/UnloadModel": Role.ADMIN,
    "/embedwarden.v1.AdminService/PurgeCache": Role.ADMIN,
    "/embedwarden.v1.AdminService/CheckConsistency": Role.ADMIN,
    "/embedwarden.v1.AdminService/CompareModels": Role.ADMIN,
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class SecurityConfigError(FailedPrecondition):
    """The server refuses to start with an unsafe or incomplete security configuration."""


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, TokenEntry]:
    """SHA-256 hex -> entry. Raises ManifestError naming the bad entry."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"tokens file {path}: {exc}") from None
    out: dict[str, TokenEntry] = {}
    for i, item in enumerate(data.get("tokens", [])):
        try:
            digest = str(item["sha256"]).lower()
            role = Role[str(item["role"]).upper()]
            name = str(item.get("name", f"token{i}"))
        except (KeyError, TypeError):
            raise ManifestError(
                f"tokens file {path}: tokens[{i}] needs sha256 and role (reader|writer|admin)"
            ) from None
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(f"tokens file {path}: tokens[{i}].sha256 is not a SHA-256 hex")
        out[digest] = TokenEntry(name, role)
    return out


def new_token(path: Path, name: str, role: str) -> str:
    """Creates a token, appends its hash to `path` (created 0600 if missing), returns it."""
    Role[role.upper()]  # validates
    token = secrets.token_urlsafe(32)
    entry = (
        f'\n[[tokens]]\nname = "{name}"\nsha256 = "{hash_token(token)}"\nrole = "{role.lower()}"\n'
    )
    path.touch(mode=0o600, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(entry)
    return token


def is_loopback(host: str) -> bool:
    if host in {"localhost", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_policy(settings: Settings) -> None:
    """Refuses to start on a non-loopback address without TLS and tokens (unless --insecure)."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if is_loopback(settings.host):
        return
    if settings.insecure:
        log.warning(
            "listening on %s with --insecure: %s%s. Anyone who can reach this address can "
            "use the server.",
            settings.host,
            "no TLS" if settings.tls_cert is None else "TLS on",
            ", no tokens" if settings.tokens_file is None else ", tokens on",
        )
        return
    missing = [
        flag
        for flag, value in (
            ("--tls-cert/--tls-key", settings.tls_cert),
            ("--tokens-file", settings.tokens_file),
        )
        if value is None
    ]
    if missing:
        raise SecurityConfigError(
            f"refusing to listen on {settings.host} without {' and '.join(missing)}; "
            "use 127.0.0.1, provide them, or pass --insecure to accept the risk"
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _rejecting_handler(handler: Any, error: EmbedwardenError) -> Any:
    """A handler of the same kind as `handler` that fails with the error's status code."""
    code = status_for(error)
    message = str(error)

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks `authorization: Bearer <token>` against the tokens file and the RPC's role."""

    def __init__(self, tokens: dict[str, TokenEntry]) -> None:
        self.tokens = tokens

    def authorize(self, method: str, metadata: tuple[tuple[str, Any], ...]) -> TokenEntry | None:
        """The caller's entry; raises Unauthenticated / PermissionDenied. None: open method."""
        if method.startswith(OPEN_PREFIXES):
            return None
        header = next((str(v) for k, v in metadata if k == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing credentials: send `authorization: Bearer <token>`")
        entry = self.tokens.get(hash_token(token.strip()))
        if entry is None:
            raise Unauthenticated("unknown token")
        needed = REQUIRED_ROLE.get(method, Role.ADMIN)  # unknown methods: most restrictive
        if entry.role < needed:
            raise PermissionDenied(
                f"token {entry.name!r} has role {entry.role.name.lower()}; "
                f"{method.rsplit('/', 1)[-1]} needs {needed.name.lower()}"
            )
        return entry

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        try:
            self.authorize(method, tuple(handler_call_details.invocation_metadata or ()))
        except (Unauthenticated, PermissionDenied) as exc:
            METRICS.observe_request(method.rsplit("/", 1)[-1], status_for(exc).name, 0.0)
            return _rejecting_handler(handler, exc)
        return handler


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    if settings.tokens_file is None:
        return []
    tokens = load_tokens(settings.tokens_file)
    if not tokens:
        raise SecurityConfigError(f"tokens file {settings.tokens_file} has no tokens")
    return [TokenAuthInterceptor(tokens)]
