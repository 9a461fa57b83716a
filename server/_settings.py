"""Server settings: parsed once from flags and `EMBEDWARDEN_*` variables into a frozen object.

Precedence: command-line flag, then environment variable, then default. Nothing else in the server
reads the environment for its configuration.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "efficientnet_lite0"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "embedwarden"


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know at start; passed down explicitly."""

    host: str = "127.0.0.1"
    port: int = 50051
    port_file: Path | None = None  # written with the bound port once listening (for --port 0)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # -1 disables the exporter, 0 picks a free port
    health_port: int = -1  # plaintext grpc.health.v1 only (kubelet probes); -1: none
    data_dir: Path = field(default_factory=default_data_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    models: tuple[str, ...] = (DEFAULT_MODEL,)  # NAME or NAME@VERSION, loaded at start
    models_dirs: tuple[Path, ...] = ()  # extra manifest folders beside the built-ins
    weights_dirs: tuple[Path, ...] = ()  # extra folders searched for weights files
    deterministic: bool = True
    # 0 means "pick for this machine and device" (see _frameworks.plan_threads).
    inference_lanes: int = 0  # batches run side by side per model
    torch_threads: int = 0  # intra-op threads per forward pass
    # An otherwise idle CPU server runs a lone batch on every lane's cores, at shapes where that
    # was seen to give the narrow pass's bytes (serving/_widening).
    wide_idle_passes: bool = True
    decode_workers: int = 0  # decode/preprocess threads (0: one per available core)
    max_batch_size: int = 0
    max_queue_delay_ms: float = 2.0
    max_queue_items: int = 1024  # inputs waiting for inference, per model
    max_inputs_per_request: int = 256
    max_message_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_concurrent_rpcs: int = 256
    max_streams_per_client: int = 8
    cache_enabled: bool = True
    cache_max_bytes: int = 4 * 1024**3
    min_free_disk_bytes: int = -1  # the cache leaves this free on its disk (-1: 1 GiB or 10%)
    cache_audit_fraction: float = 0.01
    cache_audit_max_per_s: float = 2.0  # recomputations per second at most (a budget, not a goal)
    cache_commit_linger_ms: float = 100.0  # a lone cache write waits this long for company
    index_snapshot_interval_s: float = 60.0  # snapshot a changed collection at most this often
    check_interval_s: float = 300.0
    consistency_warn_only: bool = False
    grace_s: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tokens_file: Path | None = None
    insecure: bool = False
    verify_diagnosis_items: int = 16  # failing items diagnosed per Verify request at most
    verify_diagnosis_seconds: float = 10.0  # diagnosis time per Verify request at most
    verify_max_pipelines: int = 64  # distinct `pipeline` label values in metrics
    parity_pairs: tuple[str, ...] = ()  # "A;B" pairs of NAME[@VERSION], comma-separated
    require_fingerprints: tuple[str, ...] = ()  # NAME@VERSION=HEX: refuse to load another one
    shipped_golden_dir: Path | None = None  # read-only golden records (--golden-dir)
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def golden_dir(self) -> Path:
        return self.data_dir / "golden"


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _coerce(name: str, raw: str) -> Any:
    """Converts an environment string to the type of the Settings field `name`."""
    default = {f.name: f for f in fields(Settings)}[name]
    kind = str(default.type)
    if "tuple[Path" in kind:
        return tuple(Path(p) for p in _parse_list(raw))
    if "tuple[str" in kind:
        return _parse_list(raw)
    if kind == "bool":
        return _parse_bool(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if "Path" in kind:
        return Path(raw) if raw else None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `serve` flags; each has an EMBEDWARDEN_<NAME> environment equivalent."""
    a = parser.add_argument
    a("--host", help="listen address (default 127.0.0.1; others need TLS and tokens)")
    a("--port", type=int, help="gRPC port (default 50051; 0 picks a free port)")
    a("--port-file", type=Path, help="write the bound gRPC port to this file once listening")
    a("--metrics-host", help="Prometheus exporter address (default 127.0.0.1)")
    a("--metrics-port", type=int, help="Prometheus exporter port (default 9464; -1 disables)")
    a(
        "--health-port",
        type=int,
        help="also serve only grpc.health.v1, in plaintext, on --host:PORT (kubelet gRPC "
        "probes cannot use TLS); -1 (default) disables",
    )
    a("--data-dir", type=Path, help="cache, index and golden embeddings (default XDG data dir)")
    a("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    a("--models", type=_parse_list, help="NAME[@VERSION],... to load at start")
    a(
        "--models-dir",
        dest="models_dirs",
        type=Path,
        action="append",
        help="extra folder of model manifests (repeatable)",
    )
    a(
        "--weights-dir",
        dest="weights_dirs",
        type=Path,
        action="append",
        help="extra folder searched for weights files (repeatable)",
    )
    a("--deterministic", type=_parse_bool, help="deterministic numerics (default true)")
    a(
        "--inference-lanes",
        type=int,
        help="batches run side by side per model (default: cores up to 4 on CPU, 1 on GPU)",
    )
    a(
        "--torch-threads",
        type=int,
        help="intra-op threads per forward pass (default: cores / lanes on CPU)",
    )
    a(
        "--wide-idle-passes",
        type=_parse_bool,
        help="on CPU, run a batch that finds the other lanes idle on all their cores, where "
        "that gives identical bytes (default true)",
    )
    a("--decode-workers", type=int, help="decode/preprocess threads (default: available cores)")
    a(
        "--max-batch-size",
        type=int,
        help="dynamic batching: largest batch (default on CPU 2 with single-threaded lanes, else "
        "4; 32 on GPU)",
    )
    a("--max-queue-delay-ms", type=float, help="dynamic batching: longest wait (default 2)")
    a("--max-queue-items", type=int, help="inputs waiting per model before RESOURCE_EXHAUSTED")
    a("--max-inputs-per-request", type=int, help="inputs per Extract request (default 256)")
    a("--max-message-bytes", type=int, help="largest gRPC message (default 64 MiB)")
    a("--max-image-pixels", type=int, help="largest decoded image, in pixels (default 40M)")
    a("--max-concurrent-rpcs", type=int, help="RPCs handled at once (default 256)")
    a("--max-streams-per-client", type=int, help="open ExtractStream calls per client")
    a("--cache", dest="cache_enabled", type=_parse_bool, help="enable the LMDB cache")
    a("--cache-max-bytes", type=int, help="cache size bound in bytes (default 4 GiB)")
    a(
        "--min-free-disk-bytes",
        type=int,
        help="free bytes the cache leaves on the data dir's disk (default: 1 GiB or 10%%)",
    )
    a("--cache-audit-fraction", type=float, help="fraction of cache hits recomputed")
    a(
        "--cache-audit-max-per-s",
        type=float,
        help="at most this many audit recomputations per second (default 2)",
    )
    a(
        "--cache-commit-linger-ms",
        type=float,
        help="a cache write waits up to this long for others to share its commit (default 100; "
        "0: commit at once)",
    )
    a(
        "--index-snapshot-interval-s",
        type=float,
        help="seconds between FAISS snapshots of a changed collection (default 60)",
    )
    a("--check-interval-s", type=float, help="seconds between periodic consistency checks")
    a(
        "--consistency-warn-only",
        type=_parse_bool,
        help="serve a model whose restart check fails (default: keep it NOT_SERVING)",
    )
    a("--grace-s", type=float, help="seconds in-flight requests get on shutdown")
    a("--tls-cert", type=Path, help="server certificate (PEM)")
    a("--tls-key", type=Path, help="server private key (PEM)")
    a("--tls-client-ca", type=Path, help="CA for client certificates (enables mutual TLS)")
    a("--tokens-file", type=Path, help="bearer tokens file (hashed tokens with roles)")
    a(
        "--insecure",
        action="store_const",
        const=True,
        help="allow a non-loopback address without TLS and tokens (logged at every start)",
    )
    a(
        "--verify-diagnosis-items",
        type=int,
        help="failing items diagnosed per Verify request at most (default 16)",
    )
    a(
        "--verify-diagnosis-seconds",
        type=float,
        help="diagnosis time per Verify request at most, in seconds (default 10)",
    )
    a("--verify-max-pipelines", type=int, help="distinct pipeline labels in metrics (default 64)")
    a("--parity-pairs", type=_parse_list, help="A;B model pairs compared periodically")
    a(
        "--require-fingerprint",
        dest="require_fingerprints",
        action="append",
        metavar="NAME@VERSION=HEX",
        help="refuse to load NAME@VERSION unless its fingerprint is HEX (repeatable)",
    )
    a(
        "--golden-dir",
        dest="shipped_golden_dir",
        type=Path,
        help="read-only golden records shipped with the deployment: checked against, never "
        "written (default: record into the data dir on first load)",
    )
    a("--log-level", help="DEBUG, INFO, WARNING, ERROR")


def from_namespace(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Builds Settings from parsed flags, falling back to EMBEDWARDEN_* variables."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        flag = getattr(ns, f.name, None)
        if flag is not None:
            values[f.name] = tuple(flag) if isinstance(flag, list) else flag
            continue
        raw = env.get(f"EMBEDWARDEN_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = _coerce(f.name, raw)
            except ValueError as exc:
                raise SystemExit(f"EMBEDWARDEN_{f.name.upper()}: {exc}") from None
    return Settings(**values)


def parse(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="embedwarden serve")
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv), env)
