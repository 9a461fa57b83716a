"""What defines a model version: its manifest, the registry of versions, verified weights, and
the pre- and postprocessing the manifest pins.

The bottom floor of the server: it imports nothing above the foundation modules (`_errors`, and
`_frameworks` for the torch import of the nvjpeg decoder), so every other concern may use it. The
built-in manifests (TOML, one file per version) ship in `builtin/`.
"""

from ._decode import DECODERS, DecodeSpec, decode_table, require_decoder
from ._decode import LEGACY as LEGACY_DECODE
from ._decode import RECOMMENDED as RECOMMENDED_DECODE
from ._manifest import (
    TEXT_LIBRARIES,
    ArchitectureSpec,
    LayerSpec,
    Manifest,
    PreprocessSpec,
    TokenizerSpec,
    parse_manifest,
)
from ._postprocess import (
    OUTPUT_DTYPES,
    Pooling,
    allowed_poolings,
    finish,
    output_layout,
    pool,
    resolve_pooling,
)
from ._preprocess import (
    GeometryPlan,
    ImageSource,
    Preprocessor,
    RawImage,
    decode,
    exif_orientation,
    plan_geometry,
    tensor_sha256,
)
from ._registry import (
    Registry,
    build_registry,
    check_fingerprint,
    parse_fingerprint,
    parse_model_ref,
)
from ._text import MAX_TEXT_BYTES, TextInput, TextPreprocessor, Tokenize, check_text
from ._weights import (
    VerifiedWeights,
    keras_models_dir,
    package_dir,
    read_verified,
    sha256_file,
    torch_hub_checkpoints,
)

__all__ = [
    "DECODERS",
    "LEGACY_DECODE",
    "MAX_TEXT_BYTES",
    "OUTPUT_DTYPES",
    "RECOMMENDED_DECODE",
    "TEXT_LIBRARIES",
    "ArchitectureSpec",
    "DecodeSpec",
    "GeometryPlan",
    "ImageSource",
    "LayerSpec",
    "Manifest",
    "Pooling",
    "PreprocessSpec",
    "Preprocessor",
    "RawImage",
    "Registry",
    "TextInput",
    "TextPreprocessor",
    "Tokenize",
    "TokenizerSpec",
    "VerifiedWeights",
    "allowed_poolings",
    "build_registry",
    "check_fingerprint",
    "check_text",
    "decode",
    "decode_table",
    "exif_orientation",
    "finish",
    "keras_models_dir",
    "output_layout",
    "package_dir",
    "parse_fingerprint",
    "parse_manifest",
    "parse_model_ref",
    "plan_geometry",
    "pool",
    "read_verified",
    "require_decoder",
    "resolve_pooling",
    "sha256_file",
    "tensor_sha256",
    "torch_hub_checkpoints",
]
