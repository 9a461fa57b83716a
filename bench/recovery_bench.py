"""Time to SERVING after `kill -9`, with and without a big un-snapshotted collection.

1. A server records the default model's golden embeddings and stops.
2. A restart with no collections: its time to SERVING is the baseline.
3. On it: an HNSW collection of `--n` unit vectors of 1280 dimensions, upserted in batches of
   `--batch` with periodic snapshots off (the whole log stays), then `kill -9`.
4. A restart: its time to SERVING (the default model's health), then how long the collection
   answers UNAVAILABLE until its log is replayed, and whether every vector is back.
5. `kill -9` again and a restart: the snapshot written after recovery means nothing is replayed.

Nothing is asserted: figures are printed, and written as JSON with `--json PATH`.

    python bench/recovery_bench.py [--n 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ServerProcess, machine, write_json

from embedwarden.client import Client, EmbedwardenError

MODEL = "efficientnet_lite0"
ARGS = ("--index-snapshot-interval-s", "0")


def back_after(client: Client, name: str, timeout: float = 1800.0) -> tuple[float, int, str]:
    """Seconds until the collection answers, its size, and the last UNAVAILABLE message."""
    started = time.perf_counter()
    last = ""
    while time.perf_counter() - started < timeout:
        try:
            size = client.describe_collection(name).size
            return time.perf_counter() - started, size, last
        except EmbedwardenError as exc:
            last = exc.details
            time.sleep(0.2)
    raise TimeoutError(f"{name} not back after {timeout}s: {last}")


def wait_snapshot(index_dir: Path, timeout: float = 1800.0) -> float:
    """Seconds until the snapshot written after recovery is complete (its JSON exists)."""
    started = time.perf_counter()
    while not list(index_dir.glob("*/snapshot-*.json")):
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"no snapshot in {index_dir} after {timeout}s")
        time.sleep(0.2)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "n": args.n}
    with tempfile.TemporaryDirectory(prefix="recovery-bench-") as tmp:
        data = Path(tmp) / "data"
        ServerProcess(data, *ARGS).start().stop()
        server = ServerProcess(data, *ARGS).start()
        results["serving_s_without_collections"] = server.serving_after
        rng = np.random.default_rng(0)
        try:
            with Client(server.address, timeout=600) as client:
                info = client.create_collection("big", MODEL, kind="hnsw")
                started = time.perf_counter()
                for start in range(0, args.n, args.batch):
                    count = min(args.batch, args.n - start)
                    vectors = rng.standard_normal((count, 1280)).astype(np.float32)
                    ids = [f"v{i}" for i in range(start, start + count)]
                    client.upsert("big", ids, vectors, fingerprint=info.fingerprint)
                results["build_s"] = time.perf_counter() - started
        finally:
            server.kill()
        for run in ("after_kill", "after_second_kill"):
            server = ServerProcess(data, *ARGS).start()
            try:
                with Client(server.address, timeout=60, retries=0) as client:
                    seconds, size, message = back_after(client, "big")
                results[run] = {
                    "serving_s": server.serving_after,
                    "collection_back_after_serving_s": seconds,
                    "size": size,
                    "last_unavailable": message,
                    # a kill before the snapshot after recovery is complete would replay again
                    "snapshot_complete_after_back_s": wait_snapshot(data / "index"),
                }
            finally:
                server.kill()
            print(run, results[run], flush=True)
    print(
        f"SERVING after {results['serving_s_without_collections']:.1f}s without collections; "
        f"with {args.n} HNSW vectors in the log: {results['after_kill']['serving_s']:.1f}s, "
        f"collection back {results['after_kill']['collection_back_after_serving_s']:.1f}s "
        f"later; after a second kill: {results['after_second_kill']['serving_s']:.1f}s, back "
        f"{results['after_second_kill']['collection_back_after_serving_s']:.1f}s later "
        f"(build {results['build_s']:.0f}s; {results['machine']['cpu']}, "
        f"{results['machine']['cores']} cores)"
    )
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
