"""Extract latency while another client verifies 256 vectors that all fail.

A Verify request computes 256 references and diagnoses failing items against the catalogue of
preprocessing mistakes: the heaviest request a reader can send. It runs as background work of
the batcher, so Extract requests of other clients should see close to idle latency. Measured in
one run against one server (its own process, default configuration, cache off for Extract):

- Extract p50/p99 of 1-image requests from one client, idle;
- the same while a second client sends a 256-item Verify of random vectors (all fail);
- how long that Verify took, how many items it diagnosed and how many it skipped for budget.

Nothing is asserted; the figures are printed, and written as JSON with `--json PATH`.

    python bench/verify_bench.py [--seconds 8] [--json results/verify.json]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as scripts (python bench/NAME.py): this folder is on sys.path.
from _common import ServerProcess, machine, percentiles, photo_jpegs, write_json

from embedwarden.client import Client

MODEL = "efficientnet_lite0"


def extract_latencies(client: Client, images: list[bytes], until: threading.Event) -> list[float]:
    out = []
    i = 0
    while not until.is_set():
        t0 = time.perf_counter()
        client.extract([images[i % len(images)]], MODEL, cache="off")
        out.append(time.perf_counter() - t0)
        i += 1
    return out


def measure(
    address: str,
    images: list[bytes],
    to_verify: list[bytes],
    vectors: np.ndarray,
    seconds: float,
) -> tuple[Any, float, list[float], list[float]]:
    with Client(address, timeout=600) as a, Client(address, timeout=600) as b:
        for image in images:  # warm up
            a.extract([image], MODEL, cache="off")
        done = threading.Event()
        timer = threading.Timer(seconds, done.set)
        timer.start()
        idle = extract_latencies(a, images, done)
        busy: list[float] = []
        done = threading.Event()
        thread = threading.Thread(target=lambda: busy.extend(extract_latencies(a, images, done)))
        thread.start()
        t0 = time.perf_counter()
        report = b.verify(to_verify, vectors, MODEL, layer="features", pipeline="bench")
        verify_seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    return report, verify_seconds, idle, busy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="idle measurement length")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    images = photo_jpegs(8, seed=1)
    to_verify = photo_jpegs(args.items, seed=2)
    vectors = np.random.default_rng(0).normal(size=(args.items, 1280)).astype(np.float32)
    with tempfile.TemporaryDirectory() as data:
        server = ServerProcess(Path(data) / "data").start()  # port and log files in `data`
        try:
            report, verify_seconds, idle, busy = measure(
                server.address, images, to_verify, vectors, args.seconds
            )
        finally:
            server.stop()
    states = [item.diagnosis_state for item in report.items]
    idle_p, busy_p = percentiles(idle), percentiles(busy)
    results: dict[str, Any] = {
        "machine": machine(),
        "extract_idle": idle_p,
        "extract_during_verify": busy_p,
        "p50_ratio": busy_p["p50"] / idle_p["p50"],
        "p99_ratio": busy_p["p99"] / idle_p["p99"],
        "verify_items": args.items,
        "verify_failed": report.failed,
        "verify_seconds": verify_seconds,
        "verify_diagnosis_seconds": report.diagnosis_seconds,
        "diagnosed": states.count("done"),
        "skipped_for_budget": states.count("skipped_budget"),
    }
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores")
    print(
        f"Extract 1 image, idle: p50 {idle_p['p50'] * 1e3:.1f} ms, p99 {idle_p['p99'] * 1e3:.1f}"
        f" ms ({int(idle_p['n'])} calls)"
    )
    print(
        f"Extract during a {args.items}-item failing Verify: p50 {busy_p['p50'] * 1e3:.1f} ms "
        f"({results['p50_ratio']:.2f}x idle), p99 {busy_p['p99'] * 1e3:.1f} ms "
        f"({results['p99_ratio']:.2f}x) ({int(busy_p['n'])} calls)"
    )
    print(
        f"Verify: {verify_seconds:.1f} s for {args.items} items ({report.failed} failed), "
        f"{results['diagnosed']} diagnosed in {report.diagnosis_seconds:.1f} s, "
        f"{results['skipped_for_budget']} skipped for budget"
    )
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
