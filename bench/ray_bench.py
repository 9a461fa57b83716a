"""Bulk extraction on Ray: one node of one CPU vs two nodes of one CPU each (on this machine,
loopback 127.0.0.2 / 127.0.0.3), same inputs, beside the in-process pipeline on one core.

Measures, asserts nothing. Steady-state images/s counts from the first finished batch to the
last (actors load and check their model first: that start-up is reported separately).

    python bench/ray_bench.py [--images 192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, photo_jpegs, write_json
from extract_bench import in_process

MODEL = "efficientnet_lite0"
NODES = ("127.0.0.2", "127.0.0.3")


def ray_run(folder: Path, out: Path, data_dir: Path, nodes: int, batch_size: int) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    from embedwarden.ray import extract_to_parquet

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": NODES[0]}
    )
    try:
        for ip in NODES[1:nodes]:
            cluster.add_node(num_cpus=1, node_ip_address=ip)
        cluster.wait_for_nodes(timeout=60)
        marks: list[tuple[float, int]] = []
        started = time.perf_counter()
        summary = extract_to_parquet(
            [folder],
            MODEL,
            out,
            layer="features",
            address=cluster.address,
            actors=nodes,
            batch_size=batch_size,
            data_dir=data_dir,
            progress=lambda done, _total, _s: marks.append((time.perf_counter(), done)),
        )
        total = time.perf_counter() - started
    finally:
        cluster.shutdown()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return {
        "nodes": nodes,
        "images": summary.rows,
        "seconds_end_to_end": total,
        "seconds_to_first_batch": t0 - started,
        "steady_images_per_s": (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan"),
        "rows_per_node": dict(summary.nodes),
        "complete": bool(summary.verdict and summary.verdict.ok),
    }


def run(count: int, batch_size: int, seconds: float) -> dict[str, Any]:
    images = photo_jpegs(count)
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        root = Path(tmp)
        folder = root / "images"
        folder.mkdir()
        for i, data in enumerate(images):
            (folder / f"{i:05d}.jpg").write_bytes(data)
        data_dir = root / "data"
        one = ray_run(folder, root / "out1", data_dir, 1, batch_size)
        two = ray_run(folder, root / "out2", data_dir, 2, batch_size)
    baseline = in_process(images, (batch_size,), seconds)["throughput"]
    one_core = baseline[f"threads=1,batch={batch_size}"]
    return {
        "machine": machine(),
        "batch_size": batch_size,
        "one_node": one,
        "two_nodes": two,
        "two_vs_one": two["steady_images_per_s"] / one["steady_images_per_s"],
        "in_process_one_core_images_per_s": one_core,
        "one_node_vs_in_process_one_core": one["steady_images_per_s"] / one_core,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="in-process baseline time")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    results = run(args.images, args.batch_size, args.seconds)
    write_json(results, args.json)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
