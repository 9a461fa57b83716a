"""The registry: the single source of truth for which model versions exist.

Built-in manifests ship inside the package (`embedwarden.server.models`, folder `builtin/`);
`--models-dir` adds folders. A name@version can be registered once; registering a different
manifest under it is an error, re-registering the identical one is a no-op.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from .._errors import FingerprintMismatch, InvalidInput, ManifestError, NotFound
from ._manifest import Manifest, load_manifest, parse_manifest

log = logging.getLogger(__name__)

MODEL_REF_RE = re.compile(r"^(?P<name>[^@\s]+)(?:@(?P<version>[^@\s]+))?$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


def parse_model_ref(ref: str) -> tuple[str, str]:
    """'name' or 'name@version' -> (name, version or '')."""
    match = MODEL_REF_RE.match(ref.strip())
    if not match:
        raise InvalidInput(f"model reference {ref!r}: expected NAME or NAME@VERSION")
    return match["name"], match["version"] or ""


def parse_fingerprint(text: str, what: str = "fingerprint") -> str:
    """A full fingerprint: 64 hex digits (any case), returned in lower case."""
    value = text.strip().lower()
    if not FINGERPRINT_RE.match(value):
        raise InvalidInput(
            f"{what} {text!r}: expected the 64 hex digits of a model version's fingerprint "
            "(`embedwarden describe NAME@VERSION` shows it)"
        )
    return value


def check_fingerprint(manifest: Manifest, expected: str, why: str = "the request pins") -> None:
    """Raises FingerprintMismatch (FAILED_PRECONDITION) naming both fingerprints when the
    version's computed fingerprint is not `expected` (a full, lower-case fingerprint)."""
    actual = manifest.fingerprint()
    if actual != expected:
        raise FingerprintMismatch(
            f"{manifest.ref} has fingerprint {actual}, but {why} {expected}: this server "
            "runs another definition of that version (manifest or weights); send the request "
            "to a server of the pinned fingerprint, or pin the fingerprint this one reports"
        )


def _version_key(version: str) -> tuple[int, ...] | tuple[float, str]:
    """Numeric versions sort numerically ("10" > "9"); others after them, by text."""
    parts = version.split(".")
    if all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return (float("inf"), version)


class Registry:
    """Registered manifests by name and version. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, Manifest]] = {}

    def register(self, manifest: Manifest) -> Manifest:
        with self._lock:
            versions = self._models.setdefault(manifest.name, {})
            existing = versions.get(manifest.version)
            if existing is not None:
                if existing != manifest:
                    raise ManifestError(
                        f"{manifest.ref} is already registered (from {existing.origin}) with a "
                        f"different manifest ({manifest.origin}); a model version is immutable: "
                        "give the changed manifest a new version"
                    )
                return existing
            if manifest.default and any(m.default for m in versions.values()):
                other = next(m for m in versions.values() if m.default)
                raise ManifestError(
                    f"{manifest.ref} and {other.ref} both claim to be the default version"
                )
            versions[manifest.version] = manifest
            log.debug("registered %s (fingerprint %s)", manifest.ref, manifest.fingerprint()[:12])
            return manifest

    def register_text(self, text: str, origin: str = "<string>") -> Manifest:
        return self.register(parse_manifest(text, origin))

    def register_dir(self, folder: Path) -> list[Manifest]:
        if not folder.is_dir():
            raise ManifestError(f"models folder {folder} does not exist")
        return [self.register(load_manifest(p)) for p in sorted(folder.glob("*.toml"))]

    def register_builtins(self) -> list[Manifest]:
        root = resources.files("embedwarden.server.models") / "builtin"
        out: list[Manifest] = []
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".toml"):
                text = entry.read_text(encoding="utf-8")
                out.append(self.register(parse_manifest(text, f"builtin:{entry.name}")))
        return out

    def resolve(self, name: str, version: str = "", fingerprint: str = "") -> Manifest:
        """The manifest for name@version; an empty version means the default version. With a
        `fingerprint` (64 hex digits), a version with another one raises FingerprintMismatch."""
        manifest = self._resolve(name, version)
        if fingerprint:
            check_fingerprint(manifest, parse_fingerprint(fingerprint))
        return manifest

    def _resolve(self, name: str, version: str) -> Manifest:
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                known = ", ".join(sorted(self._models)) or "none"
                raise NotFound(f"unknown model {name!r}; registered models: {known}")
            if version:
                manifest = versions.get(version)
                if manifest is None:
                    known = ", ".join(sorted(versions, key=_version_key))
                    raise NotFound(f"model {name!r} has no version {version!r}; versions: {known}")
                return manifest
            return self._default(versions)

    def resolve_ref(self, ref: str) -> Manifest:
        return self.resolve(*parse_model_ref(ref))

    def by_fingerprint(self, fingerprint: str) -> Manifest | None:
        for manifest in self.all():
            if manifest.fingerprint() == fingerprint:
                return manifest
        return None

    @staticmethod
    def _default(versions: dict[str, Manifest]) -> Manifest:
        flagged = [m for m in versions.values() if m.default]
        if flagged:
            return flagged[0]
        return versions[max(versions, key=_version_key)]

    def is_default(self, manifest: Manifest) -> bool:
        return self.resolve(manifest.name) is manifest

    def all(self) -> list[Manifest]:
        with self._lock:
            return [
                versions[v]
                for name in sorted(self._models)
                for versions in [self._models[name]]
                for v in sorted(versions, key=_version_key)
            ]


def build_registry(extra_dirs: Iterable[Path] = ()) -> Registry:
    registry = Registry()
    registry.register_builtins()
    for folder in extra_dirs:
        registry.register_dir(folder)
    return registry
