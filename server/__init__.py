"""Embedwarden server: pinned, verified intermediate-layer embeddings over gRPC.

One folder per concern, each re-exporting the few names the others use: `models` (manifests,
registry, weights, pre/postprocessing), `backbones` (one module per framework), `serving`
(loaded models, dynamic batching, the Extract use case), `cache`, `index`, `consistency` and
`rpc` (servicers, converters, status codes, security). At this level: the wiring (`_app`), the
entry point (`_main`), settings, errors, metrics, process-wide framework setup, and `testing`.
"""

from ._app import Application, create_server, serve
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
from ._frameworks import (
    available_cores,
    configure_process,
    import_tensorflow,
    pass_threads,
    process_flags,
)
from ._main import main
from ._settings import Settings
from ._settings import parse as parse_settings
from .models import Manifest, Registry, build_registry, parse_manifest

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
    "Settings",
    "Unavailable",
    "WeightsVerificationError",
    "available_cores",
    "build_registry",
    "configure_process",
    "create_server",
    "import_tensorflow",
    "main",
    "parse_manifest",
    "parse_settings",
    "pass_threads",
    "process_flags",
    "serve",
]
