"""Model manifests: the immutable, fully pinned description of one model version.

A manifest is data (one TOML file per version). It pins the framework and architecture, the
weights file and its SHA-256, the complete preprocessing, the layer catalogue and the numeric
policy. Parsing is strict: unknown keys and out-of-range values are errors, so that a typo can't
silently fall back to a default.

The fingerprint is the SHA-256 of the canonical manifest (sorted-key JSON of every field that can
change an output) followed by the weights hash. Prose (description, license, source), where the
weights file is found (`package`, `path`) and the `default` flag are not part of it: moving a
weights file or fixing a typo in a description does not invalidate cached vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .._errors import ManifestError, NotFound
from ._decode import (
    ALPHA_POLICIES,
    CMYK_RULES,
    DECODERS,
    EXIF_POLICIES,
    FORMATS,
    FRAME_RULES,
    GRAYSCALE_RULES,
    ICC_POLICIES,
    LEGACY,
    PALETTE_RULES,
    SIXTEEN_BIT_RULES,
    DecodeSpec,
)

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

FRAMEWORKS = ("torch", "keras", "transformers", "onnxruntime")
TEXT_FRAMEWORKS = ("transformers", "onnxruntime")
# The libraries a text framework needs (the `text` extra), which also change its numbers: their
# versions go into the golden record.
TEXT_LIBRARIES = {
    "transformers": ("transformers", "tokenizers", "safetensors"),
    "onnxruntime": ("transformers", "tokenizers", "onnxruntime"),
}
WEIGHT_FORMATS = ("torch_state_dict", "keras_weights", "safetensors", "onnx")
RESIZE_MODES = ("crop_resize", "resize_crop", "resize")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
COLOR_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16", "bfloat16")
TRUNCATION_SIDES = ("right", "left")
TEXT_POOLINGS = ("mean", "cls")
# Keys left out of the fingerprint: they locate or describe, they don't change outputs.
NON_IDENTITY_KEYS = ("description", "license", "source", "default")
NON_IDENTITY_WEIGHT_KEYS = ("package", "path")


@dataclass(frozen=True)
class ArchitectureSpec:
    framework: str
    builder: str  # e.g. "efficientnet_lite0", "torchvision:resnet50", "keras:MobileNetV2"
    num_classes: int = 1000
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsSpec:
    file: str
    sha256: str
    format: str
    package: str = ""  # a Python package that ships the file
    path: str = ""  # explicit location; relative paths are relative to the manifest's folder


@dataclass(frozen=True)
class PreprocessSpec:
    """Decode and preprocessing, completely: nothing here may be left to a library default."""

    decoder: str  # pillow (libjpeg-turbo, CPU) or nvjpeg (JPEGs on the GPU): see `_nvjpeg`
    color_order: str
    resize_mode: str  # crop_resize: crop a fraction of the short side, then resize to `size`
    size: int  # resize_crop: resize the short side to `resize_size`, then centre-crop `size`
    interpolation: str  # resize: squash the whole image to `size` x `size`
    antialias: bool
    divisor: float  # x / divisor, then (x - mean) / std, per channel in `color_order`
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str
    resize_size: int = 0
    crop_fraction: float = 0.0
    decode: DecodeSpec = LEGACY  # the manifest's [decode] table

    @property
    def decoding(self) -> tuple[DecodeSpec, str]:
        """How bytes become pixels: the decode contract and the decoder (`decode`'s arguments);
        specs with equal `decoding` decode every input alike."""
        return self.decode, self.decoder


@dataclass(frozen=True)
class LayerSpec:
    name: str
    node: str  # framework-specific tap point (torch.fx node name, Keras layer name)
    shape: tuple[int, ...]  # per item, without the batch axis
    layout: str  # axis names: "C", "CHW", "HWC", "TC"
    tokens: bool = False
    # Text token layers: rows past the text's tokens are zero padding, and token_mean averages
    # the real tokens only ([CLS] and [SEP] included, as the attention mask counts them).
    masked: bool = False

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(i for i, axis in enumerate(self.layout) if axis in "HW")


@dataclass(frozen=True)
class TokenizerSpec:
    """A text model's tokenizer and pooling, completely: the tokenizer files are pinned by hash
    and loaded from a private copy of exactly those bytes (nothing else in the folder counts)."""

    files: Mapping[str, str]  # file name -> SHA-256, every file the tokenizer reads
    lowercase: bool
    max_length: int  # tokens, [CLS] and [SEP] included; longer texts are truncated
    truncation_side: str
    pooling: str  # the `pooled` layer: "mean" over the attention mask, or "cls"
    normalize: bool  # L2 normalisation of `pooled`, as the upstream model applies it
    package: str = ""  # where the files are found (not identity, like the weights' location)
    path: str = ""


# Stands in for [preprocess] in text manifests (which have [tokenizer] instead): never used to
# prepare an input, and left out of the fingerprint.
TEXT_NO_IMAGE = PreprocessSpec(
    decoder="pillow",
    color_order="RGB",
    resize_mode="resize",
    size=1,
    interpolation="bilinear",
    antialias=True,
    divisor=1.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    layout="NCHW",
)


@dataclass(frozen=True)
class NumericsSpec:
    dtype: str = "float32"
    deterministic: bool = True


@dataclass(frozen=True)
class ConsistencySpec:
    """Tolerances applied when the environment differs from the one golden values were made in.

    With an unchanged environment every check demands exact equality.
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    architecture: ArchitectureSpec
    weights: WeightsSpec
    preprocess: PreprocessSpec
    layers: tuple[LayerSpec, ...]
    default_layer: str
    numerics: NumericsSpec
    consistency: ConsistencySpec
    description: str = ""
    license: str = ""
    source: str = ""
    default: bool = False
    tokenizer: TokenizerSpec | None = None  # set for text models (no [preprocess] then)
    text: str = field(default="", compare=False, repr=False)
    origin: str = field(default="", compare=False, repr=False)  # file it came from

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def framework(self) -> str:
        return self.architecture.framework

    @property
    def modality(self) -> str:
        """What the model's inputs are: "text" or "image"."""
        return "image" if self.tokenizer is None else "text"

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.layers)
        raise NotFound(f"model {self.ref} has no layer {name!r}; catalogued layers: {known}")

    def canonical(self) -> dict[str, Any]:
        """The fields that define outputs, as plain JSON-able data."""
        data = asdict(self)
        for key in (*NON_IDENTITY_KEYS, "text", "origin"):
            data.pop(key, None)
        for key in NON_IDENTITY_WEIGHT_KEYS:
            data["weights"].pop(key, None)
        for layer in data["layers"]:
            if not layer["masked"]:
                layer.pop("masked")  # image layers hash as before the field existed
        if self.tokenizer is None:
            data.pop("tokenizer")
        else:
            data.pop("preprocess")
            for key in NON_IDENTITY_WEIGHT_KEYS:
                data["tokenizer"].pop(key, None)
            data["tokenizer"]["files"] = dict(sorted(self.tokenizer.files.items()))
            return data | {"schema": SCHEMA_VERSION}
        if self.preprocess.decode == LEGACY:
            # Versions made before the [decode] table existed decoded this way: their
            # fingerprints stay as they were. Any other contract is hashed, field by field.
            data["preprocess"].pop("decode")
        data["schema"] = SCHEMA_VERSION
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """SHA-256 of the canonical manifest plus the (pinned, verified) weights hash."""
        digest = hashlib.sha256()
        digest.update(self.canonical_json().encode())
        digest.update(b"\0")
        digest.update(self.weights.sha256.encode())
        return digest.hexdigest()


# --- parsing -------------------------------------------------------------------------------


class _Table:
    """Reads one TOML table, tracking used keys so that leftovers can be reported."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: expected a table")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise ManifestError(f"{self.where}: missing required key {key!r}")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(f"{self.where}.{key}: expected {_kind_name(kind)}, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise ManifestError(f"{self.where}.{key}: {value!r} is not one of {list(options)}")
        return str(value)

    def table(self, key: str, required: bool = True) -> _Table:
        if key not in self.data and not required:
            self.used.add(key)
            return _Table({}, f"{self.where}.{key}" if self.where else key)
        return _Table(self.get(key, dict), f"{self.where}.{key}" if self.where else key)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ManifestError(f"{self.where or 'manifest'}: unknown keys {unknown}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "a table",
    }.get(kind, kind.__name__)


def _triple(t: _Table, key: str) -> tuple[float, float, float]:
    values = t.get(key, list)
    if len(values) != 3 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ManifestError(f"{t.where}.{key}: expected 3 numbers (one per channel)")
    out = tuple(float(v) for v in values)
    if key == "std" and any(v <= 0 for v in out):
        raise ManifestError(f"{t.where}.std: values must be positive")
    return out[0], out[1], out[2]


def _positive(where: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ManifestError(f"{where}: must be a positive number, got {value!r}")


def _parse_preprocess(t: _Table) -> PreprocessSpec:
    layout = t.choice("layout", LAYOUTS)
    spec = PreprocessSpec(
        decoder=t.choice("decoder", DECODERS),
        color_order=t.choice("color_order", COLOR_ORDERS),
        resize_mode=t.choice("resize_mode", RESIZE_MODES),
        size=t.get("size", int),
        interpolation=t.choice("interpolation", INTERPOLATIONS),
        antialias=t.get("antialias", bool),
        divisor=t.get("divisor", float),
        mean=_triple(t, "mean"),
        std=_triple(t, "std"),
        layout=layout,
        resize_size=t.get("resize_size", int, 0),
        crop_fraction=t.get("crop_fraction", float, 0.0),
    )
    t.finish()
    _positive(f"{t.where}.size", spec.size)
    _positive(f"{t.where}.divisor", spec.divisor)
    if not spec.antialias and spec.interpolation != "nearest":
        raise ManifestError(
            f"{t.where}.antialias: Pillow's resize always antialiases when downscaling; "
            "set antialias = true"
        )
    if spec.resize_mode == "crop_resize" and not 0 < spec.crop_fraction <= 1:
        raise ManifestError(f"{t.where}.crop_fraction: crop_resize needs a value in (0, 1]")
    if spec.resize_mode == "resize_crop" and spec.resize_size < spec.size:
        raise ManifestError(f"{t.where}.resize_size: resize_crop needs resize_size >= size")
    return spec


def _parse_tokenizer(t: _Table) -> TokenizerSpec:
    files_t = t.table("files")
    files = {name: str(files_t.get(name, str)).lower() for name in files_t.data}
    files_t.finish()
    if not files:
        raise ManifestError(f"{files_t.where}: pin at least one tokenizer file")
    for name, digest in files.items():
        if not SHA256_RE.match(digest) or "/" in name or name in {".", ".."}:
            raise ManifestError(f"{files_t.where}.{name}: a bare file name = its full SHA-256")
    spec = TokenizerSpec(
        files=files,
        lowercase=t.get("lowercase", bool),
        max_length=t.get("max_length", int),
        truncation_side=t.choice("truncation_side", TRUNCATION_SIDES),
        pooling=t.choice("pooling", TEXT_POOLINGS),
        normalize=t.get("normalize", bool),
        package=t.get("package", str, ""),
        path=t.get("path", str, ""),
    )
    t.finish()
    if not 2 < spec.max_length <= 8192:
        raise ManifestError(f"{t.where}.max_length: expected 3-8192 tokens, got {spec.max_length}")
    return spec


def _parse_decode(t: _Table) -> DecodeSpec:
    """The [decode] table, every key stated."""
    formats = t.get("formats", list)
    if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
        raise ManifestError(f"{t.where}.formats: a list of distinct formats from {list(FORMATS)}")
    background = t.get("background", list)
    if len(background) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in background
    ):
        raise ManifestError(f"{t.where}.background: expected 3 integers 0-255 (R, G, B)")
    spec = DecodeSpec(
        formats=tuple(formats),
        exif=t.choice("exif", EXIF_POLICIES),
        icc=t.choice("icc", ICC_POLICIES),
        alpha=t.choice("alpha", ALPHA_POLICIES),
        background=(background[0], background[1], background[2]),
        grayscale=t.choice("grayscale", GRAYSCALE_RULES),
        palette=t.choice("palette", PALETTE_RULES),
        cmyk=t.choice("cmyk", CMYK_RULES),
        sixteen_bit=t.choice("sixteen_bit", SIXTEEN_BIT_RULES),
        frames=t.choice("frames", FRAME_RULES),
    )
    t.finish()
    return spec


def _default_layout(shape: tuple[int, ...], tokens: bool, image_layout: str) -> str:
    if tokens:
        return "TC"
    if len(shape) == 1:
        return "C"
    if len(shape) == 3:
        return "CHW" if image_layout == "NCHW" else "HWC"
    raise ManifestError(f"cannot infer the layout of a layer of shape {list(shape)}; set `layout`")


def _parse_layers(raw: Any, image_layout: str) -> tuple[LayerSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError("layers: expected at least one [[layers]] entry")
    layers: list[LayerSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        t = _Table(item, f"layers[{i}]")
        name = t.get("name", str)
        if not NAME_RE.match(name) or name in seen:
            raise ManifestError(f"layers[{i}].name: {name!r} is invalid or repeated")
        seen.add(name)
        shape_raw = t.get("shape", list)
        if not shape_raw or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape_raw
        ):
            raise ManifestError(f"layers[{i}].shape: expected positive integers")
        shape = tuple(shape_raw)
        tokens = t.get("tokens", bool, False)
        layout = t.get("layout", str, "") or _default_layout(shape, tokens, image_layout)
        if len(layout) != len(shape) or set(layout) - set("CHWT"):
            raise ManifestError(f"layers[{i}].layout: {layout!r} does not match shape {shape}")
        masked = t.get("masked", bool, False)
        if masked and not tokens:
            raise ManifestError(f"layers[{i}].masked: only token layers (tokens = true) are masked")
        layers.append(LayerSpec(name, t.get("node", str), shape, layout, tokens, masked))
        t.finish()
    return tuple(layers)


def parse_manifest(text: str, origin: str = "<string>") -> Manifest:
    """Parses and validates a manifest; raises ManifestError naming the offending key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from None
    try:
        return _parse(data, text, origin)
    except ManifestError as exc:
        raise ManifestError(f"{origin}: {exc}") from None


def _parse(data: Mapping[str, Any], text: str, origin: str) -> Manifest:
    top = _Table(data, "")
    schema = top.get("schema", int)
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"schema: this server reads schema {SCHEMA_VERSION}, got {schema}")
    name = top.get("name", str)
    version = top.get("version", str)
    if not NAME_RE.match(name):
        raise ManifestError(f"name: {name!r} must match {NAME_RE.pattern}")
    if not VERSION_RE.match(version):
        raise ManifestError(f"version: {version!r} must match {VERSION_RE.pattern}")

    arch_t = top.table("architecture")
    arch = ArchitectureSpec(
        framework=arch_t.choice("framework", FRAMEWORKS),
        builder=arch_t.get("builder", str),
        num_classes=arch_t.get("num_classes", int, 1000),
        options=dict(arch_t.get("options", dict, {})),
    )
    arch_t.finish()

    w_t = top.table("weights")
    weights = WeightsSpec(
        file=w_t.get("file", str),
        sha256=w_t.get("sha256", str).lower(),
        format=w_t.choice("format", WEIGHT_FORMATS),
        package=w_t.get("package", str, ""),
        path=w_t.get("path", str, ""),
    )
    w_t.finish()
    if not SHA256_RE.match(weights.sha256):
        raise ManifestError("weights.sha256: expected the full 64-hex-digit SHA-256 of the file")
    if "/" in weights.file or "\\" in weights.file or weights.file in {"", ".", ".."}:
        raise ManifestError("weights.file: a bare file name (put folders in `path`)")

    tokenizer = None
    if arch.framework in TEXT_FRAMEWORKS:
        if "preprocess" in data or "decode" in data:
            raise ManifestError(
                "preprocess: text models ([architecture] framework "
                f"{arch.framework!r}) state a [tokenizer] table instead of [preprocess]/[decode]"
            )
        tokenizer = _parse_tokenizer(top.table("tokenizer"))
        preprocess = TEXT_NO_IMAGE
    else:
        preprocess = _parse_preprocess(top.table("preprocess"))
    if "decode" in data:  # left out: the legacy contract (manifests older than the table)
        preprocess = replace(preprocess, decode=_parse_decode(top.table("decode")))
    layers = _parse_layers(top.get("layers", list), preprocess.layout)
    default_layer = top.get("default_layer", str)
    if default_layer not in {layer.name for layer in layers}:
        raise ManifestError(f"default_layer: {default_layer!r} is not in the layer catalogue")

    n_t = top.table("numerics", required=False)
    numerics = NumericsSpec(
        dtype=n_t.choice("dtype", DTYPES, "float32"),
        deterministic=n_t.get("deterministic", bool, True),
    )
    n_t.finish()

    c_t = top.table("consistency", required=False)
    consistency = ConsistencySpec(
        atol=c_t.get("atol", float, ConsistencySpec.atol),
        rtol=c_t.get("rtol", float, ConsistencySpec.rtol),
        min_cosine=c_t.get("min_cosine", float, ConsistencySpec.min_cosine),
    )
    c_t.finish()

    manifest = Manifest(
        name=name,
        version=version,
        architecture=arch,
        weights=weights,
        preprocess=preprocess,
        layers=layers,
        default_layer=default_layer,
        numerics=numerics,
        consistency=consistency,
        description=top.get("description", str, ""),
        license=top.get("license", str, ""),
        source=top.get("source", str, ""),
        default=top.get("default", bool, False),
        tokenizer=tokenizer,
        text=text,
        origin=origin,
    )
    top.finish()
    return manifest


def load_manifest(path: Path) -> Manifest:
    return parse_manifest(path.read_text(encoding="utf-8"), origin=str(path))
