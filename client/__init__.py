"""Embedwarden client: a typed, blocking gRPC client and the `embedwarden` CLI.

Installs without any deep-learning framework (`pip install embedwarden`).
"""

from ._api_index import Hit, SearchResults
from ._api_verify import MistakeMatch, VerifiedVector, VerifyReport
from ._client import Client, Extraction, ModelIdentity, image_input
from ._exceptions import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    EmbedwardenError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ._types import Text

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "EmbedwardenError",
    "Extraction",
    "FailedPrecondition",
    "Hit",
    "InternalError",
    "InvalidArgument",
    "MistakeMatch",
    "ModelIdentity",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SearchResults",
    "Text",
    "Unauthenticated",
    "Unavailable",
    "VerifiedVector",
    "VerifyReport",
    "image_input",
]
