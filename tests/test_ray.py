"""Bulk extraction on a real two-node Ray cluster on this machine (loopback 127.0.0.2 and
127.0.0.3, one CPU each), against the server's own Extract; resume, bad inputs, refusals,
verify-parquet. Every Ray process started here is stopped here, and a watchdog bounds the
whole module (a cluster that cannot form fails, never hangs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode, free_port

from embedwarden.client import InvalidArgument
from embedwarden.ray import ClusterError, JobSpec, OutputError, extract_to_parquet, verify
from embedwarden.ray._actor import ActorConfig, Embedder
from embedwarden.server import ConsistencyFailure, FingerprintMismatch, build_registry

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
MANIFEST = build_registry().resolve(MODEL)
FINGERPRINT = MANIFEST.fingerprint()
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
MODULE_LIMIT_S = 420.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    from ray.cluster_utils import Cluster

    started = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": HEAD})
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(MODULE_LIMIT_S):
            started.shutdown()  # every job then fails instead of hanging the suite

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        started.add_node(num_cpus=1, node_ip_address=WORKER)
        started.wait_for_nodes(timeout=60)
        yield started.address
    finally:
        done.set()
        started.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, bytes]) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name, data in photos.items():
        (folder / f"{name}.jpg").write_bytes(data)
    (folder / "nested").mkdir()
    (folder / "nested" / "chelsea.png").write_bytes(
        encode(np.asarray(_decode(photos["chelsea"])), "PNG")
    )
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (folder / "truncated.jpg").write_bytes(photos["coffee"][:2000])
    return folder


def _decode(data: bytes) -> object:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The driver's data dir: the golden record is made there once, then shipped."""
    return tmp_path_factory.mktemp("driver-data")


@pytest.fixture(scope="module")
def job(
    cluster: str, images: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("job") / "out"
    summary = extract_to_parquet(
        [images], MODEL, out, layer="features", address=cluster, batch_size=1, data_dir=data_dir
    )
    return out, summary


def _rows(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "rows").glob("part-*")))


def test_rows_on_both_nodes_with_one_fingerprint_and_the_server_extract(job, client):
    out, summary = job
    assert summary.verdict.ok, summary.describe()
    rows = _rows(out)
    assert rows.num_rows == 5 and summary.errors == 2
    assert set(rows.column("node").to_pylist()) == {HEAD, WORKER}
    assert set(rows.column("fingerprint").to_pylist()) == {FINGERPRINT}
    for path in (out / "rows").glob("part-*"):
        meta = json.loads(pq.read_schema(path).metadata[b"embedwarden"])
        assert meta["fingerprint"] == FINGERPRINT and meta["layer"] == "features"
        assert meta["pooling"] == "avg" and meta["environment"]["ray"] == "2.60.0"
        assert meta["golden_id"].startswith(f"{MODEL}@1-{FINGERPRINT[:16]}:")
    assert rows.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    # The same files through the server's Extract RPC.
    paths = rows.column("path").to_pylist()
    ray_vectors = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False))
    served = client.extract(paths, MODEL, layers="features", cache="off")["features"]
    difference = float(np.abs(ray_vectors - served).max())
    scale = float(np.abs(served).max())
    identical = bool(np.array_equal(ray_vectors, served))
    print(f"ray vs Extract: max|d| {difference:.3g} (scale {scale:.3g}), identical {identical}")
    assert difference <= MANIFEST.consistency.atol + MANIFEST.consistency.rtol * scale


def test_bad_inputs_are_recorded_with_the_server_messages(job, client):
    out, _summary = job
    errors = pa.concat_tables(pq.read_table(p) for p in (out / "errors").glob("part-*"))
    columns = (errors.column("path").to_pylist(), errors.column("reason").to_pylist())
    reasons = dict(zip(*columns, strict=True))
    assert {Path(p).name for p in reasons} == {"corrupt.jpg", "truncated.jpg"}
    assert not any(errors.column("transient").to_pylist())
    for path, reason in reasons.items():
        with pytest.raises(InvalidArgument) as caught:
            client.extract([Path(path).read_bytes()], MODEL, cache="off")
        assert caught.value.details == f"inputs[0]: {reason}"


def test_a_rerun_writes_nothing_new(job, cluster, images, data_dir):
    out, _summary = job
    before = sorted(p.name for p in out.rglob("part-*"))
    again = extract_to_parquet(
        [images], MODEL, out, layer="features", address=cluster, data_dir=data_dir
    )
    assert again.rows == 0 and again.errors == 0 and again.skipped == 7
    assert sorted(p.name for p in out.rglob("part-*")) == before
    assert again.verdict.ok


def test_an_interrupted_job_is_finished_by_a_rerun(job, cluster, images, data_dir, tmp_path):
    """Losing a file of rows (as a job killed before its last flush does) leaves a gap that
    verify-parquet reports; the rerun computes exactly what is missing."""
    out, _summary = job
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    lost = sorted((copy / "rows").glob("part-*"))[0]
    lost_rows = pq.read_table(lost).num_rows
    lost.unlink()
    assert not verify(copy).ok and len(verify(copy).missing) == lost_rows
    cli = [sys.executable, "-m", "embedwarden.client", "verify-parquet", str(copy)]
    assert subprocess.run(cli, capture_output=True, timeout=120).returncode == 1
    again = extract_to_parquet(
        [images], MODEL, copy, layer="features", address=cluster, actors=1, data_dir=data_dir
    )
    assert again.rows == lost_rows and again.verdict.ok
    assert subprocess.run(cli, capture_output=True, timeout=120).returncode == 0


def test_verify_parquet_refuses_a_mix_of_fingerprints(job, tmp_path):
    out, _summary = job
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    part = sorted((copy / "rows").glob("part-*"))[0]
    table = pq.read_table(part)
    meta = json.loads(table.schema.metadata[b"embedwarden"])
    meta["fingerprint"] = "f" * 64
    other = table.replace_schema_metadata({b"embedwarden": json.dumps(meta).encode()})
    other = other.set_column(3, "fingerprint", pa.array(["f" * 64] * other.num_rows))
    pq.write_table(other, copy / "rows" / "part-other.parquet")
    verdict = verify(copy)
    assert not verdict.ok and len(verdict.fingerprints) == 2


def test_another_fingerprint_refuses_the_folder_and_a_wrong_pin_writes_nothing(
    job, cluster, images, tmp_path
):
    out, _summary = job
    models = tmp_path / "models"
    models.mkdir()
    text = MANIFEST.text.replace(f'name = "{MODEL}"', 'name = "lite_other"')
    (models / "lite_other@1.toml").write_text(text)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(OutputError, match=FINGERPRINT):
        extract_to_parquet(
            [images], "lite_other", out, layer="features", address=cluster, models_dirs=[models]
        )
    assert sorted(p.name for p in out.rglob("*")) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(FingerprintMismatch, match="0" * 64):
        extract_to_parquet([images], MODEL, fresh, address=cluster, expect_fingerprint="0" * 64)
    assert not fresh.exists()


def test_an_address_without_a_cluster_fails_fast_and_writes_nothing(images, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(ClusterError, match="no Ray cluster answers"):
        extract_to_parquet(
            [images], MODEL, out, address=f"{HEAD}:{free_port()}", data_dir=tmp_path / "data"
        )
    assert time.monotonic() - started < 60
    assert not out.exists()


def test_an_address_that_is_not_a_ray_cluster_fails_fast(server, images, tmp_path):
    """A gRPC server of another kind (here: Embedwarden) is not taken for a Ray head."""
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(ClusterError, match="not a Ray cluster"):
        extract_to_parquet([images], MODEL, out, address=server.address, data_dir=tmp_path / "data")
    assert time.monotonic() - started < 60
    assert not out.exists()


def test_the_cli_form(job, cluster, images, tmp_path):
    """`embedwarden extract ... --ray ADDRESS --out DIR` with its default batch size: a job
    smaller than a batch per actor still reaches both nodes; then, on the API job's folder,
    nothing to do."""
    out, _summary = job

    def cli(folder: Path) -> str:
        cmd = [
            sys.executable, "-m", "embedwarden.client", "extract", str(images), "--model", MODEL,
            "--layer", "features", "--ray", cluster, "--out", str(folder),
            "--data-dir", str(tmp_path),
        ]  # fmt: skip
        env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    fresh = cli(tmp_path / "cli-out")
    assert "0 already done, 5 rows and 2 errors written" in fresh
    nodes = re.search(r"rows per node: (.*)", fresh)
    assert nodes is not None and "127.0.0.2: " in nodes[1] and "127.0.0.3: " in nodes[1], fresh
    assert "7 already done, 0 rows and 0 errors written" in cli(out)


def _descendants(pid: int) -> list[int]:
    """Processes started (transitively) by `pid`: the Ray processes this test started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _embedder_actor_pids() -> list[int]:
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "MapWorker" in title and "Embedder" in title:
            pids.append(pid)
    return pids


def test_killing_an_actor_mid_job_never_leaves_a_silent_gap(cluster, photos, data_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        name = list(photos)[i % len(photos)]
        (folder / f"{i:02d}-{name}.jpg").write_bytes(photos[name])
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one(done: int, _total: int, _rate: float | None) -> None:
        if done >= 2 and not killed:
            pids = _embedder_actor_pids()
            assert pids, "no Embedder actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    try:
        first = extract_to_parquet(
            [folder], MODEL, out, layer="features", address=cluster, batch_size=1,
            data_dir=data_dir, progress=kill_one,
        )  # fmt: skip
        complete = first.verdict is not None and first.verdict.ok
    except Exception as exc:  # the job may fail with its actor: then it must say so
        print(f"job failed with its actor: {type(exc).__name__}")
        complete = False
    assert killed
    verdict = verify(out)
    print(f"after the kill: complete={complete}, {verdict.describe()}")
    assert not verdict.duplicates
    if not complete:
        assert not verdict.ok and verdict.missing  # reported, never silent
        extract_to_parquet(
            [folder], MODEL, out, layer="features", address=cluster, actors=1, data_dir=data_dir
        )
    final = verify(out)
    assert final.ok and final.rows == 8 and not final.duplicates, final.describe()


def _config(data_dir: Path, **changes: object) -> ActorConfig:
    from embedwarden.ray._job import golden_record

    folder, files = golden_record(MODEL, "1", data_dir, (), "cpu", 1)
    values: dict[str, object] = {
        "model": MODEL, "version": "1", "fingerprint": FINGERPRINT, "layer": "features",
        "pooling": "avg", "dtype": "float32", "dimension": 1280, "golden_folder": folder,
        "golden_files": files,
    }  # fmt: skip
    values.update(changes)
    return ActorConfig(**values)  # type: ignore[arg-type]


def test_the_actor_refuses_another_fingerprint_and_a_golden_record_that_differs(data_dir):
    """The actor's own checks, in this process: the driver's fingerprint, the shipped record."""
    with pytest.raises(FingerprintMismatch, match="0" * 64):
        Embedder(_config(data_dir, fingerprint="0" * 64))
    good = _config(data_dir)
    tampered = dict(good.golden_files)
    record = json.loads(tampered["record.json"])
    record["state_checksum"] = "0" * 64  # another model's weights were recorded
    tampered["record.json"] = json.dumps(record).encode()
    with pytest.raises(ConsistencyFailure, match="weights"):
        Embedder(_config(data_dir, golden_files=tampered))


def test_a_failing_check_in_the_actors_fails_the_job_before_writing(
    cluster, images, data_dir, tmp_path
):
    shipped = tmp_path / "data"
    shutil.copytree(data_dir / "golden", shipped / "golden")
    (arrays,) = (shipped / "golden").glob("*/arrays.npz")
    arrays.write_bytes(arrays.read_bytes()[:-100])  # a corrupted record
    out = tmp_path / "out"
    with pytest.raises(Exception, match="golden record"):
        extract_to_parquet([images], MODEL, out, address=cluster, actors=1, data_dir=shipped)
    assert not out.exists()


def test_float16_rows_are_a_fixed_size_list_of_halves(tmp_path):
    from embedwarden.ray._job import _Writer

    spec = JobSpec(MODEL, "1", FINGERPRINT, "features", "avg", "float16", 3, "g")
    writer = _Writer(tmp_path, spec)
    vectors = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=np.float16)
    writer.add(
        {
            "path": np.array(["/a.jpg", "/b.jpg"], dtype=object),
            "sha256": np.array(["aa", ""], dtype=object),
            "embedding": vectors,
            "error": np.array(["", "could not decode"], dtype=object),
            "transient": np.array([False, False]),
            "node": np.array([HEAD, HEAD], dtype=object),
        }
    )
    writer.flush()
    (rows,) = (tmp_path / "rows").glob("part-*")
    table = pq.read_table(rows)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 3)
    assert table.column("embedding").to_pylist() == [[0.5, -1.0, 2.0]]
    (errors,) = (tmp_path / "errors").glob("part-*")
    assert pq.read_table(errors).column("reason").to_pylist() == ["could not decode"]


def test_inputs_from_folders_files_and_lists(images, tmp_path):
    from embedwarden.ray import resolve_inputs

    listed = tmp_path / "list.txt"
    listed.write_text(f"{images / 'coffee.jpg'}\n\n{images / 'rocket.jpg'}\n")
    table = pa.table({"path": [str(images / "nested" / "chelsea.png")]})
    pq.write_table(table, tmp_path / "list.parquet")
    found = resolve_inputs([listed, tmp_path / "list.parquet", images / "coffee.jpg"])
    assert [Path(p).name for p in found] == ["coffee.jpg", "chelsea.png", "rocket.jpg"]
    assert len(resolve_inputs([images])) == 7  # recursive, sorted, image files only
    with pytest.raises(FileNotFoundError):
        resolve_inputs([tmp_path / "absent"])


def test_unreadable_and_oversized_files_become_error_rows(images, tmp_path):
    from embedwarden.ray._actor import read_inputs

    paths = [str(images / "coffee.jpg"), str(tmp_path / "vanished.jpg"), str(images)]
    out = read_inputs({"path": np.array(paths, dtype=object)}, max_file_bytes=1 << 30)
    assert list(out["error"][:1]) == [""] and len(out["sha256"][0]) == 64
    assert out["transient"][1] and out["transient"][2]  # gone, a folder: may be back later
    assert "cannot read the file" in out["error"][1]
    small = read_inputs({"path": np.array(paths[:1], dtype=object)}, max_file_bytes=100)
    assert not small["transient"][0] and "larger than the limit" in small["error"][0]
