"""Cache-miss extraction through the server beside the same pipeline run in-process.

Baselines, measured in the same run on the same machine:
- in-process: decode + preprocess + model + pooling with the very code the server uses
  (Preprocessor, TorchBackbone, finish), one batch at a time, at its best batch size;
- in-process single-image latency.
Server figures: throughput with 1, 8 and 32 concurrent clients (distinct 640x480 JPEGs, so every
request is a cache miss), single-client latency p50/p99, and ExtractStream beside unary Extract.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedwarden.client import Client

try:
    from bench._common import ServerProcess, machine, percentiles, photo_jpegs
except ImportError:  # run as a script from bench/
    from _common import ServerProcess, machine, percentiles, photo_jpegs  # type: ignore[no-redef]

MODEL = "efficientnet_lite0"


def in_process(
    images: Sequence[bytes], batch_sizes: Sequence[int], seconds: float
) -> dict[str, Any]:
    """Throughput of decode+preprocess+infer+pool per batch size, and single-image latency."""
    from embedwarden.server import build_registry
    from embedwarden.server._frameworks import configure_process
    from embedwarden.server._postprocess import Pooling, finish
    from embedwarden.server._preprocess import Preprocessor
    from embedwarden.server._weights import read_verified
    from embedwarden.server.backbones._torch import TorchBackbone

    configure_process(deterministic=True, torch_threads=0)
    manifest = build_registry().resolve(MODEL)
    backbone = TorchBackbone(manifest, read_verified(manifest)[1], "cpu")
    pre = Preprocessor(manifest.preprocess)
    layer = manifest.layer("features")

    def run(batch: Sequence[bytes]) -> list[np.ndarray]:
        tensors = np.stack([pre.prepare(b, 40_000_000) for b in batch])
        out = backbone.infer(tensors, ["features"])["features"]
        return [finish(o, layer, Pooling.AVG, False, "float32") for o in out]

    run(images[:4])  # warm-up
    throughput: dict[str, float] = {}
    for bs in batch_sizes:
        done, i = 0, 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            run([images[(i + k) % len(images)] for k in range(bs)])
            done += bs
            i += bs
        throughput[str(bs)] = done / (time.perf_counter() - started)
    latencies = []
    for i in range(40):
        t0 = time.perf_counter()
        run([images[i % len(images)]])
        latencies.append(time.perf_counter() - t0)
    best = max(throughput, key=lambda k: throughput[k])
    backbone.close()
    return {
        "throughput_by_batch": throughput,
        "best_batch": int(best),
        "best_throughput": throughput[best],
        "latency": percentiles(latencies),
    }


def server_throughput(
    address: str, images: Sequence[bytes], clients: int, seconds: float, per_request: int = 1
) -> float:
    """Images/s with `clients` threads each sending `per_request` distinct images per call."""
    counter = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    cursor = [0]

    def next_batch() -> list[bytes]:
        with lock:
            start = cursor[0]
            cursor[0] += per_request
        return [images[(start + k) % len(images)] for k in range(per_request)]

    def worker() -> None:
        with Client(address, timeout=120) as c:
            while time.perf_counter() < stop:
                c.extract(next_batch(), MODEL, layers="features", pooling="avg", cache="off")
                with lock:
                    counter[0] += per_request

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counter[0] / (time.perf_counter() - started)


def server_latency(address: str, images: Sequence[bytes], count: int) -> dict[str, float]:
    with Client(address) as c:
        c.extract(images[:1], MODEL, cache="off")
        samples = []
        for i in range(count):
            t0 = time.perf_counter()
            c.extract(
                [images[i % len(images)]], MODEL, layers="features", pooling="avg", cache="off"
            )
            samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def stream_vs_unary(address: str, images: Sequence[bytes], chunk: int) -> dict[str, float]:
    with Client(address, timeout=600) as c:
        t0 = time.perf_counter()
        n = sum(
            len(e.array) for e in c.extract_stream(images, MODEL, batch_size=chunk, cache="off")
        )
        stream = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, len(images), chunk):
            c.extract(images[i : i + chunk], MODEL, cache="off")
        unary = len(images) / (time.perf_counter() - t0)
    return {"stream_images_per_s": stream, "unary_images_per_s": unary, "ratio": stream / unary}


def run(data_dir: Path, seconds: float = 10.0, quick: bool = False) -> dict[str, Any]:
    images = photo_jpegs(64 if quick else 256)
    baseline = in_process(images, (1, 2, 4, 8, 16), seconds / 2)
    server = ServerProcess(data_dir, "--cache", "false").start()
    try:
        by_clients = {
            str(n): server_throughput(server.address, images, n, seconds) for n in (1, 8, 32)
        }
        latency = server_latency(server.address, images, 40 if quick else 100)
        stream = stream_vs_unary(server.address, images[: 64 if quick else 128], 16)
    finally:
        server.stop()
    best = baseline["best_throughput"]
    return {
        "machine": machine(),
        "in_process": baseline,
        "server_throughput_by_clients": by_clients,
        "throughput_ratio_by_clients": {k: v / best for k, v in by_clients.items()},
        "server_latency": latency,
        "latency_overhead_p50_ms": (latency["p50"] - baseline["latency"]["p50"]) * 1000,
        "stream": stream,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("bench/results/extract-data"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.data_dir, args.seconds, args.quick), indent=2))


if __name__ == "__main__":
    main()
