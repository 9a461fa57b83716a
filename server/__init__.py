"""Embedwarden server: pinned, verified intermediate-layer embeddings over gRPC."""

from ._app import Application, ServerThread, create_server, serve
from ._errors import (
    AlreadyExists,
    ConsistencyFailure,
    EmbedwardenError,
    FailedPrecondition,
    FingerprintMismatch,
    InvalidInput,
    LimitExceeded,
    ManifestError,
    NotFound,
    Overloaded,
    Unavailable,
    WeightsVerificationError,
)
from ._manifest import Manifest, parse_manifest
from ._registry import Registry, build_registry
from ._settings import Settings

__all__ = [
    "AlreadyExists",
    "Application",
    "ConsistencyFailure",
    "EmbedwardenError",
    "FailedPrecondition",
    "FingerprintMismatch",
    "InvalidInput",
    "LimitExceeded",
    "Manifest",
    "ManifestError",
    "NotFound",
    "Overloaded",
    "Registry",
    "ServerThread",
    "Settings",
    "Unavailable",
    "WeightsVerificationError",
    "build_registry",
    "create_server",
    "parse_manifest",
    "serve",
]
