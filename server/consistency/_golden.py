"""Golden records: what a model version produced on the canaries at its first load, persisted.

One folder per version under `golden_dir`, named `NAME@VERSION-<fingerprint[:16]>` and made
atomically (written into a temporary folder, fsynced, renamed into place), holding:
- `record.json`: identity, the canonical manifest, the environment (library versions, device,
  dtype, CPU capability, process flags), the in-memory state checksum, per canary its id and
  input hash and the SHA-256 of its preprocessed tensor, per layer and canary the SHA-256 of the
  full float32 output, and the SHA-256 of `arrays.npz`;
- `arrays.npz`: the preprocessed canary tensors; per layer the canaries' outputs pooled over
  every axis but channels (mean and max), and the full outputs of the first two canaries where
  they fit a budget (`FULL_TENSOR_BUDGET`; early, large layers first, in catalogue order).
Under an unchanged environment the full-output hashes make the comparison bit-exact for every
layer without storing every map; the pooled values and the few full tensors let a changed
environment be compared within tolerance.

A record is never rewritten. To re-record a version on purpose (say after a deliberate library
upgrade), delete its folder; better, register the new behaviour as a new version.

A store can be read-only (`--golden-dir`: records shipped with a deployment, so that every
replica checks against the same reference instead of recording its own on a fresh volume).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConsistencyFailure
from .._frameworks import import_torch, process_flags
from .._metrics import METRICS
from .._storage import disk_full, is_disk_full
from ..models import TEXT_LIBRARIES, Manifest
from ..serving import ModelIdentity, model_folder

log = logging.getLogger(__name__)

FORMAT = 1
RECORD = "record.json"
ARRAYS = "arrays.npz"
FULL_CANARIES = 2
FULL_TENSOR_BUDGET = 8 << 20  # bytes of full float32 outputs kept per record
STALE_TMP_S = 3600.0
# Process flags of a framework a model does not use don't change its outputs.
_FOREIGN_PREFIXES = {
    "torch": ("tensorflow", "keras", "tf_"),
    "keras": (),
    "transformers": ("tensorflow", "keras", "tf_"),
    "onnxruntime": ("tensorflow", "keras", "tf_"),
}


@dataclass
class CanaryEmbeddings:
    """One pass of the canaries through a model, in the form that is compared and persisted."""

    ids: list[str]
    source_sha256: list[str]
    tensor_sha256: list[str]
    tensors: np.ndarray  # [n, *input shape] float32, as preprocessed
    avg: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [n, C]
    max: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [n, C], maps/tokens only
    full: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [k, *shape], k <= 2
    output_sha256: dict[str, list[str]] = field(default_factory=dict)  # layer -> per canary


@dataclass
class GoldenRecord:
    name: str
    version: str
    fingerprint: str
    weights_sha256: str
    manifest: dict[str, Any]  # canonical manifest, to name what changed under a version
    environment: dict[str, str]
    state_checksum: str
    recorded_at: float
    canary_set: int
    embeddings: CanaryEmbeddings
    path: Path | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def full_plan(manifest: Manifest, canaries: int = FULL_CANARIES) -> dict[str, int]:
    """How many leading canaries keep full outputs, per layer, within the byte budget."""
    plan = {layer.name: 0 for layer in manifest.layers}
    left = FULL_TENSOR_BUDGET
    for k in range(1, canaries + 1):
        for layer in manifest.layers:
            size = 4 * int(np.prod(layer.shape))
            if plan[layer.name] == k - 1 and size <= left:
                plan[layer.name] = k
                left -= size
    return plan


# --- environment -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def environment(device: str, manifest: Manifest) -> dict[str, str]:
    """Everything outside the manifest that can change a model's numbers."""
    torch = import_torch()
    env = dict(process_flags())
    env.update(
        device=device,
        dtype=manifest.numerics.dtype,
        embedwarden=_package_version("embedwarden"),
        machine=platform.machine(),
        cpu=_cpu_model(),
        cpu_capability=str(torch.backends.cpu.get_cpu_capability()),
    )
    for library in TEXT_LIBRARIES.get(manifest.framework, ()):
        env[library] = _package_version(library)
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cudnn"] = str(torch.backends.cudnn.version())
    return env


def relevant(env: dict[str, str], framework: str) -> dict[str, str]:
    foreign = _FOREIGN_PREFIXES.get(framework, ())
    return {k: v for k, v in env.items() if not k.startswith(foreign)}


def env_changes(recorded: dict[str, str], current: dict[str, str], framework: str) -> list[str]:
    """Human-readable differences, e.g. ['torch 2.14.1 -> 2.15.0'], for one framework."""
    a, b = relevant(recorded, framework), relevant(current, framework)
    return [
        f"{key} {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def manifest_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Fields that differ between two canonical manifests, e.g. "preprocess.interpolation:
    'bicubic' -> 'bilinear'"."""
    if not path:  # compare as stored: JSON (tuples become lists)
        old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(f"{where}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
            else:
                out.extend(manifest_changes(old[key], new[key], where))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            change
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for change in manifest_changes(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


# --- persistence --------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _as_lists(arrays: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in arrays.items()}


class GoldenStore:
    """Golden records under one folder. Safe for several processes: a record appears whole or
    not at all, and the first writer of a version wins."""

    def __init__(self, root: Path, read_only: bool = False) -> None:
        self.root = root
        self.read_only = read_only

    def folder(self, identity: ModelIdentity) -> Path:
        return model_folder(self.root, identity)

    def find(self, identity: ModelIdentity) -> GoldenRecord | None:
        """The record of exactly this fingerprint, if any; raises ConsistencyFailure when the
        record exists but cannot be read or fails its own checksum."""
        path = self.folder(identity)
        return self.load(path) if path.is_dir() else None

    def others(self, identity: ModelIdentity) -> list[dict[str, Any]]:
        """Metadata of records of the same name@version with another fingerprint, newest
        first: a manifest or weights changed without a version bump."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob(f"{identity.name}@{identity.version}-*"):
            try:
                meta = json.loads((path / RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (
                meta.get("name") == identity.name
                and meta.get("version") == identity.version
                and meta.get("fingerprint") != identity.fingerprint
            ):
                meta["path"] = str(path)
                found.append(meta)
        return sorted(found, key=lambda m: -float(m.get("recorded_at", 0)))

    def load(self, path: Path) -> GoldenRecord:
        try:
            return self._load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConsistencyFailure(
                f"golden record {path} cannot be read ({type(exc).__name__}: {exc}); restore "
                "it, or delete the folder to re-record"
            ) from None

    def _load(self, path: Path) -> GoldenRecord:
        meta = json.loads((path / RECORD).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ConsistencyFailure(
                f"golden record {path} has format {meta.get('format')}; this server reads "
                f"format {FORMAT}"
            )
        arrays_path = path / ARRAYS
        if _sha256_file(arrays_path) != meta["arrays_sha256"]:
            raise ConsistencyFailure(
                f"golden record {path}: {ARRAYS} does not match the checksum in {RECORD} "
                "(corrupted); restore it from a backup, or delete the folder to re-record"
            )
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        c = meta["canaries"]
        embeddings = CanaryEmbeddings(
            ids=[x["id"] for x in c],
            source_sha256=[x["source_sha256"] for x in c],
            tensor_sha256=[x["tensor_sha256"] for x in c],
            tensors=arrays["tensors"],
            avg={k[4:]: v for k, v in arrays.items() if k.startswith("avg/")},
            max={k[4:]: v for k, v in arrays.items() if k.startswith("max/")},
            full={k[5:]: v for k, v in arrays.items() if k.startswith("full/")},
            output_sha256={k: list(v) for k, v in meta["output_sha256"].items()},
        )
        return GoldenRecord(
            name=meta["name"],
            version=meta["version"],
            fingerprint=meta["fingerprint"],
            weights_sha256=meta["weights_sha256"],
            manifest=meta["manifest"],
            environment=meta["environment"],
            state_checksum=meta["state_checksum"],
            recorded_at=float(meta["recorded_at"]),
            canary_set=int(meta["canary_set"]),
            embeddings=embeddings,
            path=path,
        )

    def save(self, record: GoldenRecord) -> GoldenRecord:
        """Writes the record atomically; if another writer got there first, returns theirs."""
        identity = ModelIdentity(
            record.name, record.version, record.fingerprint, record.weights_sha256
        )
        final = self.folder(identity)
        if final.is_dir():
            return self.load(final)
        if self.read_only:
            raise ConsistencyFailure(
                f"golden records in {self.root} are read-only (--golden-dir); {record.ref} "
                "has none there"
            )
        try:
            self._write(record, final)
        except OSError as exc:
            if is_disk_full(exc):
                METRICS.storage_write_failures.labels("golden", "disk_full").inc()
                raise disk_full(
                    self.root.parent, f"recording the golden embeddings of {record.ref}"
                ) from None
            raise ConsistencyFailure(
                f"cannot record the golden embeddings of {record.ref} in {self.root} ({exc}); "
                "the data directory must be writable"
            ) from None
        log.info("recorded golden embeddings of %s in %s", record.ref, final)
        return self.load(final)

    def _write(self, record: GoldenRecord, final: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            e = record.embeddings
            arrays = {"tensors": e.tensors}
            arrays.update({f"avg/{k}": v for k, v in e.avg.items()})
            arrays.update({f"max/{k}": v for k, v in e.max.items()})
            arrays.update({f"full/{k}": v for k, v in e.full.items()})
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
            data = buffer.getvalue()
            meta = {
                "format": FORMAT,
                "name": record.name,
                "version": record.version,
                "fingerprint": record.fingerprint,
                "weights_sha256": record.weights_sha256,
                "recorded_at": record.recorded_at,
                "recorded_at_utc": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.recorded_at)
                ),
                "canary_set": record.canary_set,
                "environment": record.environment,
                "state_checksum": record.state_checksum,
                "manifest": record.manifest,
                "canaries": [
                    {"id": i, "source_sha256": s, "tensor_sha256": t}
                    for i, s, t in zip(e.ids, e.source_sha256, e.tensor_sha256, strict=True)
                ],
                "output_sha256": e.output_sha256,
                "shapes": {"full": _as_lists(e.full), "avg": _as_lists(e.avg)},
                "arrays_sha256": hashlib.sha256(data).hexdigest(),
            }
            for name, payload in (
                (ARRAYS, data),
                (RECORD, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()),
            ):
                with (tmp / name).open("wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            try:
                tmp.rename(final)
            except OSError:
                if final.is_dir():  # another process recorded this version meanwhile
                    return
                raise
            _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        """Leftovers of a writer that crashed before its rename."""
        now = time.time()
        for path in self.root.glob(".tmp-*"):
            try:
                if now - path.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue
