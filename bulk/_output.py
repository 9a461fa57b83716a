"""The Parquet output of a bulk job: layout, schema and metadata, what a folder already holds,
and the check `embedwarden verify-parquet` runs.

    OUT/inputs.parquet      every input path of the job (the count rows + errors must cover)
    OUT/rows/part-*.parquet path, sha256, embedding, fingerprint, layer, pooling, node
    OUT/errors/part-*.parquet  path, sha256, reason (the server's message), transient

Every file is written to a temporary name and renamed, so a killed job leaves whole files only.
Each file's schema metadata (`embedwarden` key, JSON) names the model version, fingerprint,
layer, pooling, dtype, golden record and library versions.
"""

from __future__ import annotations

import json
import os
import platform
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"embedwarden"
INPUTS = "inputs.parquet"
ROWS = "rows"
ERRORS = "errors"


class OutputError(Exception):
    """The output folder cannot take this job (another fingerprint, another job)."""


@dataclass(frozen=True)
class JobSpec:
    """What defines the vectors of a job: everything in the files' metadata but the run."""

    model: str
    version: str
    fingerprint: str
    layer: str
    pooling: str
    dtype: str
    dimension: int
    golden_id: str

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "pooling": self.pooling,
            "dtype": self.dtype,
            "dimension": self.dimension,
            "golden_id": self.golden_id,
            "environment": environment(),
        }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def environment() -> dict[str, str]:
    names = ("embedwarden", "ray", "torch", "torchvision", "numpy", "pillow", "pyarrow")
    env = {name: _version(name) for name in names}
    env["python"] = platform.python_version()
    return env


def row_schema(spec: JobSpec) -> pa.Schema:
    value = pa.float16() if spec.dtype == "float16" else pa.float32()
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", value), spec.dimension), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("pooling", pa.string(), nullable=False),
        pa.field("node", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(spec.metadata()).encode()})


def error_schema(spec: JobSpec) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # empty when the file was unreadable
        pa.field("reason", pa.string(), nullable=False),
        pa.field("transient", pa.bool_(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(spec.metadata()).encode()})


def write_atomic(table: pa.Table, path: Path) -> None:
    """Writes `table` under a temporary name, fsyncs, renames: readers see whole files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    pq.write_table(table, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def part_name() -> str:
    return f"part-{uuid.uuid4().hex}.parquet"


def file_metadata(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    if META_KEY not in meta:
        raise OutputError(f"{path} is not an embedwarden bulk output (no metadata)")
    result: dict[str, Any] = json.loads(meta[META_KEY])
    return result


def parts(out: Path, kind: str) -> list[Path]:
    return sorted((out / kind).glob("part-*.parquet")) if (out / kind).is_dir() else []


@dataclass
class State:
    """What an output folder holds already."""

    fingerprints: set[str] = field(default_factory=set)
    rows: dict[str, list[str]] = field(default_factory=dict)  # path -> sha256 of each row
    errors: dict[str, tuple[str, str, bool]] = field(default_factory=dict)  # path -> last
    inputs: list[str] = field(default_factory=list)
    golden_id: str = ""
    row_files: int = 0
    error_files: int = 0


def read_state(out: Path) -> State:
    state = State()
    for path in parts(out, ROWS):
        meta = file_metadata(path)
        state.fingerprints.add(meta["fingerprint"])
        state.golden_id = state.golden_id or meta["golden_id"]
        table = pq.read_table(path, columns=["path", "sha256", "fingerprint"])
        state.fingerprints.update(table.column("fingerprint").unique().to_pylist())
        for p, s in zip(
            table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True
        ):
            state.rows.setdefault(p, []).append(s)
        state.row_files += 1
    for path in parts(out, ERRORS):
        state.fingerprints.add(file_metadata(path)["fingerprint"])
        table = pq.read_table(path, columns=["path", "sha256", "reason", "transient"])
        for p, s, r, t in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            state.errors[p] = (s, r, bool(t))
        state.error_files += 1
    if (out / INPUTS).is_file():
        state.inputs = pq.read_table(out / INPUTS).column("path").to_pylist()
    return state


def write_inputs(out: Path, paths: Sequence[str], spec: JobSpec) -> None:
    table = pa.table(
        {"path": pa.array(paths, pa.string())},
        schema=pa.schema(
            [pa.field("path", pa.string())],
            metadata={META_KEY: json.dumps(spec.metadata()).encode()},
        ),
    )
    write_atomic(table, out / INPUTS)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    inputs: int
    rows: int
    errors: int
    fingerprints: list[str]
    missing: list[str]
    duplicates: list[str]

    def describe(self) -> str:
        lines = [
            f"{self.inputs} inputs: {self.rows} rows, {self.errors} errors, "
            f"{len(self.missing)} missing, {len(self.duplicates)} duplicated; fingerprints "
            + (", ".join(f[:16] for f in self.fingerprints) or "none")
        ]
        if len(self.fingerprints) > 1:
            lines.append("MIXED: rows of several model versions in one output")
        lines += [f"missing: {p}" for p in self.missing[:10]]
        lines += [f"duplicated: {p}" for p in self.duplicates[:10]]
        return "\n".join(lines)


def verify(out: Path) -> Verdict:
    """One fingerprint across every file and row; each input has exactly one row or an error
    (a row supersedes an earlier transient error of the same input)."""
    if not (out / INPUTS).is_file():
        raise OutputError(f"{out} holds no bulk job output ({INPUTS} is missing)")
    state = read_state(out)
    covered = set(state.rows) | set(state.errors)
    missing = [p for p in state.inputs if p not in covered]
    duplicates = sorted(p for p, shas in state.rows.items() if len(shas) > 1)
    errors = sum(1 for p in state.errors if p not in state.rows)
    ok = len(state.fingerprints) <= 1 and not missing and not duplicates
    return Verdict(
        ok,
        len(state.inputs),
        sum(len(s) for s in state.rows.values()),
        errors,
        sorted(state.fingerprints),
        missing,
        duplicates,
    )
