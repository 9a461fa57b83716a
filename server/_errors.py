"""Typed domain errors. Each maps to exactly one gRPC status code in `rpc/_status`.

Messages are written for the caller: they say what was wrong and how to fix the request.
"""

from __future__ import annotations


class EmbedwardenError(Exception):
    """Base of every error the service reports on purpose."""


class InvalidInput(EmbedwardenError):
    """The request is malformed: a bad image, a wrong array, an unknown enum value, a bad name."""


class LimitExceeded(InvalidInput):
    """The request is well formed but larger than a configured limit (inputs, pixels, ids)."""


class NotFound(EmbedwardenError):
    """A named model, version, layer or collection does not exist."""


class AlreadyExists(EmbedwardenError):
    """Creating something that exists already, with different settings."""


class FailedPrecondition(EmbedwardenError):
    """The request is valid but the system is not in a state to run it."""


class FingerprintMismatch(FailedPrecondition):
    """Two fingerprints that must be equal are not: vectors of one model version sent to a
    collection bound to another, a request (`ModelRef.fingerprint`) or `--require-fingerprint`
    pinning a fingerprint the server's version does not have."""


class WeightsVerificationError(FailedPrecondition):
    """A weights file is missing or its SHA-256 differs from the manifest: the model won't load."""


class ConsistencyFailure(FailedPrecondition):
    """A model's outputs differ from its golden embeddings beyond tolerance."""


class ManifestError(InvalidInput):
    """A model manifest is invalid, or conflicts with a registered one."""


class Overloaded(EmbedwardenError):
    """A bounded queue is full; the client should back off and retry."""


class DiskFull(EmbedwardenError):
    """The data directory's filesystem has no room for a write; retry once space is freed."""


class Unavailable(EmbedwardenError):
    """Temporarily unable to serve (model still loading, server shutting down); retry later."""


class Unauthenticated(EmbedwardenError):
    """Missing or unknown credentials."""


class PermissionDenied(EmbedwardenError):
    """Known caller without the role this RPC needs."""


class InternalFault(EmbedwardenError):
    """A bug, logged with its traceback where it happened: the caller sees INTERNAL with this
    generic message (never the exception's own text), and the traceback is not logged again."""
