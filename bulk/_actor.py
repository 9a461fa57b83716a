"""What runs on the Ray workers: reading input files, and the stateful embedding actor.

The actor is a server without its gRPC front: an `Application` (the server's own wiring) loads
the pinned version exactly as `embedwarden serve` does: the manifest from the registry, the
fingerprint checked against the driver's before the weights are read (`--require-fingerprint`),
the weights file's SHA-256 verified, warm-up shapes, and the restart consistency check of the
canaries against the golden record the driver shipped (read-only, `--golden-dir`), under the
server's policy. Any failure raises in the constructor, which fails the job (Ray does not
retry constructors by default) before anything is written. Batches go through the server's
Extract use case, so vectors come from the same code as the `Extract` RPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ActorConfig:
    model: str
    version: str
    fingerprint: str
    layer: str
    pooling: str
    dtype: str
    dimension: int
    golden_folder: str  # NAME@VERSION-<fingerprint[:16]>
    golden_files: dict[str, bytes]  # record.json, arrays.npz
    models_dirs: tuple[str, ...] = ()  # extra manifest folders, as the workers see them
    device: str = "cpu"
    threads: int = 1
    max_batch_size: int = 0
    max_file_bytes: int = 64 * 1024 * 1024


def read_inputs(batch: Batch, max_file_bytes: int) -> Batch:
    """path -> bytes and SHA-256; an unreadable file becomes an error row (transient: the
    disk or network may be back on a rerun), a file over the limit a permanent one."""
    paths = [str(p) for p in batch["path"]]
    data: list[bytes] = []
    digests: list[str] = []
    errors: list[str] = []
    transient: list[bool] = []
    for path in paths:
        try:
            size = os.stat(path).st_size
            if size > max_file_bytes:
                raise ValueError(
                    f"{size} bytes is larger than the limit of {max_file_bytes} bytes per input"
                )
            content = Path(path).read_bytes()
        except OSError as exc:
            data.append(b"")
            digests.append("")
            errors.append(f"cannot read the file: {exc.strerror or exc}")
            transient.append(True)
            continue
        except ValueError as exc:
            data.append(b"")
            digests.append("")
            errors.append(str(exc))
            transient.append(False)
            continue
        data.append(content)
        digests.append(hashlib.sha256(content).hexdigest())
        errors.append("")
        transient.append(False)
    return {
        "path": np.array(paths, dtype=object),
        "data": np.array(data, dtype=object),
        "sha256": np.array(digests, dtype=object),
        "error": np.array(errors, dtype=object),
        "transient": np.array(transient, dtype=bool),
    }


def _write_golden(root: Path, folder: str, files: dict[str, bytes]) -> Path:
    target = root / folder
    target.mkdir(parents=True)
    for name, content in files.items():
        (target / name).write_bytes(content)
        (target / name).chmod(stat.S_IRUSR | stat.S_IRGRP)
    return root


class Embedder:
    """The callable class of `map_batches`: one model version, loaded and checked once."""

    def __init__(self, config: ActorConfig) -> None:
        import ray

        from embedwarden.server import Application, Settings

        self.config = config
        scratch = Path(tempfile.mkdtemp(prefix="embedwarden-ray-"))
        golden = _write_golden(scratch / "golden", config.golden_folder, config.golden_files)
        settings = Settings(
            port=0,
            metrics_port=-1,
            data_dir=scratch / "data",
            device=config.device,
            models=(),
            models_dirs=tuple(Path(d) for d in config.models_dirs),
            cache_enabled=False,
            require_fingerprints=(f"{config.model}@{config.version}={config.fingerprint}",),
            shipped_golden_dir=golden,
            inference_lanes=1,
            torch_threads=config.threads,
            decode_workers=1,
            max_batch_size=config.max_batch_size,
            check_interval_s=1e9,  # the job is short; its checks are the load-time ones
        )
        self.app = Application(settings)
        self.model = self.app.models.load(config.model, config.version)
        if self.model.identity.fingerprint != config.fingerprint:  # the pin made sure; say so
            raise RuntimeError("the loaded version is not the driver's")
        self.node = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]

    def __call__(self, batch: Batch) -> Batch:
        from embedwarden.server import InvalidInput
        from embedwarden.server.models import Pooling
        from embedwarden.server.serving import CacheMode, ExtractOptions

        c = self.config
        n = len(batch["path"])
        errors = [str(e) for e in batch["error"]]
        transient = [bool(t) for t in batch["transient"]]
        limit = self.app.settings.max_image_pixels
        good = []
        for i in range(n):
            if errors[i]:
                continue
            try:  # each input alone first: one bad file must not fail its neighbours
                self.model.preprocessor.prepare(bytes(batch["data"][i]), limit)
            except InvalidInput as exc:
                errors[i] = str(exc)
                continue
            good.append(i)
        vectors = np.zeros((n, c.dimension), dtype=np.float16 if c.dtype == "float16" else "f4")
        if good:
            options = ExtractOptions(
                layers=(c.layer,), pooling=Pooling(c.pooling), dtype=c.dtype, cache=CacheMode.OFF
            )
            sources = [bytes(batch["data"][i]) for i in good]
            result = asyncio.run(self.app.extraction.extract(c.model, c.version, sources, options))
            if result.identity.fingerprint != c.fingerprint:
                raise RuntimeError("the served version changed under the job")
            for i, item in zip(good, result.items, strict=True):
                vectors[i] = item[0].array.reshape(-1)
        return {
            "path": batch["path"],
            "sha256": batch["sha256"],
            "embedding": vectors,
            "error": np.array(errors, dtype=object),
            "transient": np.array(transient, dtype=bool),
            "node": np.array([self.node] * n, dtype=object),
        }
