"""The driver of a bulk job: resolve the version and inputs, ship the golden record, run the
Ray Data pipeline, write Parquet, check the result.

    from_items(paths) -> map_batches(read_inputs)          tasks: bytes + SHA-256, not pixels
                      -> map_batches(Embedder, ActorPoolStrategy)   the server's own code
                      -> iter_batches on the driver -> OUT/rows, OUT/errors (whole files)

The driver writes (rather than `write_parquet` on the workers) so that it can tell rows from
bad inputs, flush whole files only, show progress, and check the folder at the end.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._actor import ActorConfig, Embedder, read_inputs
from ._output import (
    ERRORS,
    ROWS,
    JobSpec,
    OutputError,
    Verdict,
    error_schema,
    file_metadata,
    part_name,
    parts,
    read_state,
    row_schema,
    verify,
    write_atomic,
    write_inputs,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
FLUSH_ROWS = 4096
MAX_BLOCKS = 20_000
CONNECT_TIMEOUT_S = 10.0


class ClusterError(Exception):
    """No Ray cluster at the address, or one that cannot run the job."""


@dataclass
class Summary:
    spec: JobSpec
    inputs: int
    skipped: int
    rows: int
    errors: int
    seconds: float
    nodes: Counter[str] = field(default_factory=Counter)
    verdict: Verdict | None = None

    def describe(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        nodes = ", ".join(f"{n}: {c}" for n, c in sorted(self.nodes.items())) or "none"
        lines = [
            f"{self.spec.model}@{self.spec.version} (fingerprint {self.spec.fingerprint[:16]}) "
            f"layer {self.spec.layer} pooling {self.spec.pooling}: {self.inputs} inputs, "
            f"{self.skipped} already done, {self.rows} rows and {self.errors} errors written in "
            f"{self.seconds:.1f}s ({rate:.1f} images/s); rows per node: {nodes}",
        ]
        if self.verdict is not None:
            lines.append(
                ("complete: " if self.verdict.ok else "INCOMPLETE: ") + self.verdict.describe()
            )
        return "\n".join(lines)


# --- inputs --------------------------------------------------------------------------------


def resolve_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """Folders (walked recursively, image files only), files, or lists of paths (`.txt`, one a
    line; `.parquet` with a `path` column), as sorted absolute paths without repeats."""
    found: set[str] = set()
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found.update(
                str(p.resolve())
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.suffix == ".txt" and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            found.update(str(Path(line.strip()).resolve()) for line in lines if line.strip())
        elif path.suffix == ".parquet" and path.is_file():
            column = pq.read_table(path, columns=["path"]).column("path").to_pylist()
            found.update(str(Path(p).resolve()) for p in column)
        elif path.exists():
            found.add(str(path.resolve()))
        else:
            raise FileNotFoundError(f"input {entry} does not exist")
    return sorted(found)


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# --- the version, its golden record --------------------------------------------------------


def golden_record(
    model: str, version: str, data_dir: Path, models_dirs: Sequence[Path], device: str, threads: int
) -> tuple[str, dict[str, bytes]]:
    """The version's golden record from `data_dir` (made once here, by loading the model with
    the server's code, when there is none): folder name and files to ship to the actors."""
    import asyncio

    from embedwarden.server import Application, Settings, build_registry
    from embedwarden.server.serving import ModelIdentity, model_folder

    manifest = build_registry(models_dirs).resolve(model, version)
    folder = model_folder(data_dir / "golden", ModelIdentity.of(manifest))
    if not folder.is_dir():
        print(f"recording the golden embeddings of {manifest.ref} in {folder}", file=sys.stderr)
        settings = Settings(
            port=0,
            metrics_port=-1,
            data_dir=data_dir,
            device=device,
            models=(),
            models_dirs=tuple(models_dirs),
            cache_enabled=False,
            inference_lanes=1,
            torch_threads=threads,
            decode_workers=1,
            check_interval_s=1e9,
        )
        app = Application(settings)
        try:
            app.models.load(manifest.name, manifest.version)
        finally:
            asyncio.run(app.stop(0))
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    return folder.name, files


# --- the cluster ---------------------------------------------------------------------------


def _probe_gcs(address: str, timeout: float) -> None:
    """One call to the cluster's GCS (its head's gRPC service): `ray.init` on anything else
    retries for ever. (Ray's generated stubs: the Ray version is pinned.)"""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]
            stub.GetClusterId(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "no answer"
            raise ClusterError(
                f"{address} is not a Ray cluster's head (its GCS did not answer: {code}); pass "
                "the address `ray start --head` printed"
            ) from None


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """`ray.init` on an address that answers as a Ray cluster (its GCS is a gRPC server),
    within `timeout`; a clear ClusterError otherwise, before anything runs."""
    import ray

    if address != "auto":
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ClusterError(f"--ray {address!r}: expected auto or HOST:PORT")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError:
            raise ClusterError(
                f"no Ray cluster answers at {address} (within {timeout:.0f}s); start one with "
                "`ray start --head --port PORT` and pass its HOST:PORT"
            ) from None
        _probe_gcs(address, timeout)
        # A driver runs on a node of the cluster; on loopback clusters, on that address.
        node_ip = host if host.startswith("127.") else None
    else:
        node_ip = None
    try:
        ray.init(
            address=address,
            _node_ip_address=node_ip,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from None


# --- the job -------------------------------------------------------------------------------


def _layer_dimension(manifest: object, layer: str, pooling: str, dtype: str) -> tuple[str, int]:
    """The catalogued layer and the length of one vector after pooling (flattened)."""
    from embedwarden.server.models import Manifest, Pooling, finish, resolve_pooling

    assert isinstance(manifest, Manifest)
    spec = manifest.layer(layer or manifest.default_layer)
    chosen = resolve_pooling(spec, Pooling(pooling))
    sample = finish(np.zeros(spec.shape, np.float32), spec, chosen, False, dtype)
    return chosen.value, int(np.prod(sample.shape))


class _Writer:
    """Buffers rows and errors; flushes whole files."""

    def __init__(self, out: Path, spec: JobSpec) -> None:
        self.out = out
        self.spec = spec
        self.rows: list[pa.Table] = []
        self.errors: list[pa.Table] = []
        self.pending = 0
        self.row_schema = row_schema(spec)
        self.error_schema = error_schema(spec)

    def add(self, batch: dict[str, np.ndarray]) -> tuple[int, int, Counter[str]]:
        failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
        ok = ~failed
        spec = self.spec
        if ok.any():
            vectors = np.ascontiguousarray(batch["embedding"][ok])
            flat = pa.array(vectors.reshape(-1), self.row_schema.field("embedding").type.value_type)
            n = int(ok.sum())
            self.rows.append(
                pa.Table.from_arrays(
                    [
                        pa.array([str(p) for p in batch["path"][ok]], pa.string()),
                        pa.array([str(s) for s in batch["sha256"][ok]], pa.string()),
                        pa.FixedSizeListArray.from_arrays(flat, spec.dimension),
                        pa.array([spec.fingerprint] * n, pa.string()),
                        pa.array([spec.layer] * n, pa.string()),
                        pa.array([spec.pooling] * n, pa.string()),
                        pa.array([str(x) for x in batch["node"][ok]], pa.string()),
                    ],
                    schema=self.row_schema,
                )
            )
        if failed.any():
            n = int(failed.sum())
            self.errors.append(
                pa.Table.from_arrays(
                    [
                        pa.array([str(p) for p in batch["path"][failed]], pa.string()),
                        pa.array([str(s) for s in batch["sha256"][failed]], pa.string()),
                        pa.array([str(e) for e in batch["error"][failed]], pa.string()),
                        pa.array([bool(t) for t in batch["transient"][failed]], pa.bool_()),
                        pa.array([spec.fingerprint] * n, pa.string()),
                    ],
                    schema=self.error_schema,
                )
            )
        self.pending += len(failed)
        if self.pending >= FLUSH_ROWS:
            self.flush()
        return int(ok.sum()), int(failed.sum()), Counter(str(x) for x in batch["node"][ok])

    def flush(self) -> None:
        if self.rows:
            write_atomic(pa.concat_tables(self.rows), self.out / ROWS / part_name())
        if self.errors:
            write_atomic(pa.concat_tables(self.errors), self.out / ERRORS / part_name())
        self.rows, self.errors, self.pending = [], [], 0


def _check_folder(out: Path, fingerprint: str, layer: str, pooling: str, dtype: str) -> None:
    """A folder holds one job: refuse another fingerprint (or layer, pooling, dtype)."""
    for path in parts(out, ROWS) + parts(out, ERRORS):
        meta = file_metadata(path)
        if meta["fingerprint"] != fingerprint:
            raise OutputError(
                f"{out} holds output of {meta['model']}@{meta['version']} with fingerprint "
                f"{meta['fingerprint']}; this job's version has {fingerprint}: write another "
                "model version into another folder"
            )
        wanted = {"layer": layer, "pooling": pooling, "dtype": dtype}
        for key, value in wanted.items():
            if meta[key] != value:
                raise OutputError(f"{out} holds {key} {meta[key]!r}, this job asks for {value!r}")


@dataclass(frozen=True)
class _Pool:
    actors: int
    actor_cpus: float
    read_cpus: float
    batch_size: int
    actor_start_timeout_s: float


def _run(
    todo: list[str],
    config: ActorConfig,
    pool: _Pool,
    out: Path,
    all_inputs: list[str],
    summary: Summary,
    progress: Callable[[int, int, float | None], None] | None,
) -> None:
    """The Ray Data pipeline, consumed on the driver into whole Parquet files."""
    import ray.data
    from ray.data import ActorPoolStrategy

    context = ray.data.DataContext.get_current()
    # Every actor loads and checks its model before any input is dispatched (a job that cannot
    # get its actors fails after actor_start_timeout_s, never hangs), and a failed check is
    # final: constructors are not retried.
    context.wait_for_min_actors_s = int(pool.actor_start_timeout_s)
    context.actor_init_retry_on_errors = False
    # A job smaller than a batch per actor is split so that every actor gets a share (else the
    # first actor takes it all and the other nodes idle).
    batch_size = max(1, min(pool.batch_size, -(-len(todo) // pool.actors)))
    # A block per batch (results stream back, progress moves) up to MAX_BLOCKS.
    batches = -(-len(todo) // batch_size)
    blocks = min(len(todo), max(2 * pool.actors, min(MAX_BLOCKS, batches)))
    ds: ray.data.Dataset = ray.data.from_items(
        [{"path": p} for p in todo], override_num_blocks=blocks
    )
    ds = ds.map_batches(
        read_inputs,  # type: ignore[arg-type]  # its keyword argument: fn_kwargs
        fn_kwargs={"max_file_bytes": config.max_file_bytes},
        batch_size=batch_size,
        num_cpus=pool.read_cpus,
    )
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"config": config},
        compute=ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=2),
        num_cpus=pool.actor_cpus,
        batch_size=batch_size,
    )
    writer = _Writer(out, summary.spec)
    wrote_inputs = False
    # The rate counts the rows after the first batch, from its arrival: actors' load and checks
    # are set-up, and a rate over one batch's arrival would be meaningless.
    running, first = 0.0, 0
    with warnings.catch_warnings():
        # A job smaller than one batch per actor is no mistake of the user's.
        warnings.filterwarnings("ignore", "The minimum number of concurrent actors", UserWarning)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if not wrote_inputs:  # the actors passed their checks: the job is on
                write_inputs(out, all_inputs, summary.spec)
                wrote_inputs = True
                running = time.perf_counter()
            rows, errors, nodes = writer.add(batch)
            summary.rows += rows
            summary.errors += errors
            summary.nodes.update(nodes)
            count = summary.rows + summary.errors
            first = first or count
            if progress is not None:
                elapsed = time.perf_counter() - running
                progress(count, len(todo), (count - first) / elapsed if count > first else None)
    writer.flush()


def extract_to_parquet(
    inputs: Sequence[str | Path],
    model: str,
    out: Path,
    *,
    layer: str = "",
    pooling: str = "default",
    dtype: str = "float32",
    address: str = "auto",
    actors: int = 2,
    actor_cpus: float = 0.6,
    read_cpus: float = 0.2,
    batch_size: int = 16,
    threads: int = 1,
    device: str = "cpu",
    data_dir: Path | None = None,
    models_dirs: Sequence[Path] = (),
    expect_fingerprint: str = "",
    actor_start_timeout_s: float = 900.0,
    progress: Callable[[int, int, float | None], None] | None = None,
) -> Summary:
    """Embeds every input into a Parquet dataset at `out` on the Ray cluster at `address`;
    resumes a folder of the same job. Returns the summary (with the folder's verdict)."""
    import ray

    from embedwarden.server import Settings, build_registry
    from embedwarden.server.models import check_fingerprint, parse_fingerprint, parse_model_ref

    started = time.perf_counter()
    manifest = build_registry(models_dirs).resolve(*parse_model_ref(model))
    if expect_fingerprint:  # before anything is read, loaded or written
        check_fingerprint(
            manifest, parse_fingerprint(expect_fingerprint), "--expect-fingerprint pins"
        )
    fingerprint = manifest.fingerprint()
    pooling, dimension = _layer_dimension(manifest, layer, pooling, dtype)
    layer = layer or manifest.default_layer
    data_dir = data_dir or Settings().data_dir
    _check_folder(out, fingerprint, layer, pooling, dtype)  # before any model is loaded

    paths = resolve_inputs(inputs)
    state = read_state(out)
    todo = []
    for path in paths:
        if path in state.rows or (path in state.errors and not state.errors[path][2]):
            done = list(state.rows.get(path, []))
            if path in state.errors:
                done.append(state.errors[path][0])
            digest = _sha256(path)  # the same content as then: nothing to do
            if digest is not None and digest in done:
                continue
        todo.append(path)
    all_inputs = sorted(set(state.inputs) | set(paths))
    spec = JobSpec(
        manifest.name, manifest.version, fingerprint, layer, pooling, dtype, dimension,
        state.golden_id,
    )  # fmt: skip
    summary = Summary(spec, len(paths), len(paths) - len(todo), 0, 0, 0.0)
    if not todo:
        if not state.inputs or set(paths) - set(state.inputs):
            write_inputs(out, all_inputs, spec)
    else:
        connect(address)  # a cluster that is not there fails before any model is loaded
        try:
            folder, files = golden_record(
                manifest.name, manifest.version, data_dir, models_dirs, device, threads
            )
            golden_id = f"{folder}:{hashlib.sha256(files['record.json']).hexdigest()[:16]}"
            summary.spec = spec = replace(spec, golden_id=golden_id)
            config = ActorConfig(
                manifest.name,
                manifest.version,
                fingerprint,
                layer,
                pooling,
                dtype,
                dimension,
                folder,
                files,
                models_dirs=tuple(str(Path(d).resolve()) for d in models_dirs),
                device=device,
                threads=threads,
            )
            pool = _Pool(actors, actor_cpus, read_cpus, batch_size, actor_start_timeout_s)
            _run(todo, config, pool, out, all_inputs, summary, progress)
        finally:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    summary.verdict = verify(out)
    return summary
