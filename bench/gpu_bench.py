"""Cache-miss extraction on a GPU: the server beside the in-process GPU pipeline, same run.

- in-process: decode + preprocess on a thread pool of the CPU cores, forward passes of batches of
  8 on the device, pooling; images/s, and the share of wall time spent decoding;
- the server with `--device DEVICE`: 1 and 8 clients, 8 distinct JPEGs per request (cache
  misses), images/s and the ratio to in-process; the share of its time in decode/preprocess
  (from the responses' timings);
- where CUDA is present: the same cache-miss path with `decoder = "nvjpeg"` (JPEGs decoded on
  the GPU) beside `decoder = "pillow"` (the CPU pool), in-process and through the server with 8
  clients: images/s and the share of time in decode, to see which keeps the GPU busy.

Runs on CPU too (`--device cpu`, no decoder comparison) as a smoke test. Nothing is asserted.

    python bench/gpu_bench.py [--device cuda] [--seconds 10] [--json results/gpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

# Run as scripts (python bench/NAME.py): this folder is on sys.path.
from _common import ServerProcess, concurrently, machine, photo_jpegs, write_json
from extract_bench import DistinctInputs, _images_per_s

from embedwarden.client import Client

MODEL = "efficientnet_lite0"
NVJPEG_MODEL = "lite0_nvjpeg"  # the same version with decoder = "nvjpeg"
BATCH = 8


def cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def write_nvjpeg_manifest(folder: Path) -> None:
    """The default model's manifest under another name, decoding JPEGs with nvJPEG."""
    from embedwarden.server import build_registry

    text = build_registry().resolve(MODEL).text
    text = text.replace(f'name = "{MODEL}"', f'name = "{NVJPEG_MODEL}"')
    text = text.replace('decoder = "pillow"', 'decoder = "nvjpeg"').replace("default = true\n", "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{NVJPEG_MODEL}@1.toml").write_text(text)


def in_process(
    images: list[bytes], device: str, seconds: float, decoder: str = "pillow"
) -> dict[str, float]:
    from embedwarden.server import available_cores, build_registry, configure_process
    from embedwarden.server.backbones import TorchBackbone
    from embedwarden.server.models import (
        Pooling,
        Preprocessor,
        finish,
        read_verified,
        require_decoder,
    )

    configure_process(deterministic=True, torch_threads=0)
    manifest = build_registry().resolve(MODEL)
    require_decoder(decoder, f"{MODEL} with decoder {decoder}")
    backbone = TorchBackbone(manifest, read_verified(manifest)[1], device)
    pre = Preprocessor(replace(manifest.preprocess, decoder=decoder))
    layer = manifest.layer("features")
    pool = ThreadPoolExecutor(available_cores())
    decode_s = 0.0

    def run(batch: list[bytes]) -> None:
        nonlocal decode_s
        t0 = time.perf_counter()
        tensors = np.stack(list(pool.map(lambda b: pre.prepare(b, 40_000_000), batch)))
        decode_s += time.perf_counter() - t0
        out = backbone.infer(tensors, ["features"])["features"]
        [finish(o, layer, Pooling.AVG, False, "float32") for o in out]

    run(images[:BATCH])  # warm-up
    decode_s = 0.0
    started = time.perf_counter()
    rate = _images_per_s(run, images, BATCH, seconds)
    wall = time.perf_counter() - started
    backbone.close()
    pool.shutdown()
    return {"images_per_s": rate, "decode_share": decode_s / wall}


def server(
    address: str, inputs: DistinctInputs, clients: int, seconds: float, model: str = MODEL
) -> dict[str, float]:
    counter = [0]
    shares: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(_k: int) -> None:
        with Client(address, timeout=120) as c:
            while time.perf_counter() < stop:
                result = c.extract(inputs.take(BATCH), model, layers="features", pooling="avg")
                t = result.timings
                with lock:
                    counter[0] += BATCH
                    if t["total"] > 0:
                        shares.append(t["preprocess"] / t["total"])

    wall = concurrently(worker, clients)
    return {"images_per_s": counter[0] / wall, "decode_share": statistics.fmean(shares or [0.0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    images = photo_jpegs(128)
    nvjpeg = args.device != "cpu" and cuda_present()
    baseline = in_process(images, args.device, args.seconds)
    results: dict[str, Any] = {"machine": machine(), "device": args.device, "in_process": baseline}
    if nvjpeg:
        results["in_process_nvjpeg"] = in_process(images, args.device, args.seconds, "nvjpeg")
    inputs = DistinctInputs(images)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--device", args.device]
        if nvjpeg:
            write_nvjpeg_manifest(Path(tmp) / "models")
            flags += ["--models-dir", str(Path(tmp) / "models")]
            flags += ["--models", f"{MODEL},{NVJPEG_MODEL}"]
        process = ServerProcess(Path(tmp) / "data", *flags).start()
        try:
            for clients in (1, 8):
                r = server(process.address, inputs, clients, args.seconds)
                r["ratio"] = r["images_per_s"] / baseline["images_per_s"]
                results[f"server_{clients}_clients"] = r
            if nvjpeg:
                r = server(process.address, inputs, 8, args.seconds, NVJPEG_MODEL)
                r["ratio"] = r["images_per_s"] / baseline["images_per_s"]
                results["server_8_clients_nvjpeg"] = r
        finally:
            process.stop()
    m = results["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; device {args.device}"
    )
    print(
        f"in-process, batches of {BATCH}: {baseline['images_per_s']:.1f} images/s, "
        f"decode {baseline['decode_share']:.0%} of wall time"
    )
    for clients in (1, 8):
        r = results[f"server_{clients}_clients"]
        print(
            f"server, {clients} client(s) x {BATCH} images/request: {r['images_per_s']:.1f} "
            f"images/s ({r['ratio']:.2f}x), decode/preprocess {r['decode_share']:.0%} of request "
            "time"
        )
    if nvjpeg:
        print("cache misses by decoder (pillow: the CPU pool; nvjpeg: JPEGs on the GPU):")
        rows = [
            ("in-process", results["in_process"], results["in_process_nvjpeg"]),
            ("server, 8 clients", results["server_8_clients"], results["server_8_clients_nvjpeg"]),
        ]
        for what, pillow, gpu in rows:
            print(
                f"  {what}: pillow {pillow['images_per_s']:.1f} images/s (decode "
                f"{pillow['decode_share']:.0%}), nvjpeg {gpu['images_per_s']:.1f} images/s (decode "
                f"{gpu['decode_share']:.0%}), nvjpeg/pillow "
                f"{gpu['images_per_s'] / pillow['images_per_s']:.2f}x"
            )
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
