"""The gRPC surface: thin servicers and their registration, protobuf <-> domain converters, the
wire templates of Extract responses, the one map from domain errors to status codes, and
security (listening policy, TLS, bearer tokens with roles).

The top floor below the wiring in `_app`: it may use every concern; no concern imports it.
"""

from ._index_servicer import IndexServicer
from ._register import add_servicer
from ._security import check_policy, interceptors, new_token, server_credentials
from ._servicers import AdminServicer, EmbeddingServicer, StreamSlots

__all__ = [
    "AdminServicer",
    "EmbeddingServicer",
    "IndexServicer",
    "StreamSlots",
    "add_servicer",
    "check_policy",
    "interceptors",
    "new_token",
    "server_credentials",
]
