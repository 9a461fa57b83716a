"""Cache-hit cost through gRPC, beside the no-op `Ping` RPC of the same server.

For each case the server answers an `Extract` whose every item is a cache hit, and a `Ping`
whose request and response are exactly as large as that Extract's (so both move the same bytes
through gRPC and protobuf); the ratio is the cost of the cache path itself: hashing the inputs,
one LMDB read transaction, checksums and building the response.

- throughput, batches of 256 and of 1 (embeddings per second), with 1 and with 2 concurrent
  callers by default (`--clients`): one caller leaves the server idle while its request and
  response are in transit, two keep it busy;
- single-item latency p50/p99, Extract and Ping calls interleaved so both see the same load.

The client sends pre-serialized requests and keeps responses as bytes (identical work for both
RPCs); `--parse` also parses every Extract response. The server runs in its own process.
Nothing is asserted: the figures are printed, and written as JSON with `--json PATH`.

    python bench/cache_bench.py [--size 224x224] [--seconds 5] [--json results/cache.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc

# Run as scripts (python bench/NAME.py): this folder is on sys.path.
from _common import ServerProcess, concurrently, machine, percentiles, photo_jpegs, write_json

from embedwarden.client import Client
from embedwarden.v1 import embedding_pb2, types_pb2

MODEL = "efficientnet_lite0"
EXTRACT = "/embedwarden.v1.EmbeddingService/Extract"
PING = "/embedwarden.v1.EmbeddingService/Ping"


def _identity(b: bytes) -> bytes:
    return b


class Caller:
    """Unary calls with pre-serialized requests; responses stay bytes unless parsed."""

    def __init__(self, address: str, parse: bool) -> None:
        size = 512 << 20
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
            ],
        )
        self.extract = self.channel.unary_unary(
            EXTRACT,
            request_serializer=_identity,
            response_deserializer=(
                embedding_pb2.ExtractResponse.FromString if parse else _identity
            ),
        )
        self.extract_raw = self.channel.unary_unary(
            EXTRACT, request_serializer=_identity, response_deserializer=_identity
        )
        self.ping = self.channel.unary_unary(
            PING, request_serializer=_identity, response_deserializer=_identity
        )

    def close(self) -> None:
        self.channel.close()


def extract_request(images: list[bytes]) -> bytes:
    return embedding_pb2.ExtractRequest(
        model=types_pb2.ModelRef(name=MODEL),
        layers=["features"],
        pooling=types_pb2.POOLING_AVG,
        inputs=[types_pb2.Input(encoded=i) for i in images],
    ).SerializeToString()


def _sized(make: Callable[[int], Any], target: int) -> Any:
    """make(n) for the largest n whose serialized size is at most `target` bytes."""
    for n in range(target, -1, -1):
        message = make(n)
        if message.ByteSize() <= target:
            return message
    raise ValueError(target)


def equal_ping(request: bytes, response: bytes) -> bytes:
    """A Ping request as large as `request` asking for a response as large as `response`."""
    reply = _sized(lambda n: embedding_pb2.PingResponse(payload=bytes(n)), len(response))
    want = len(reply.payload)
    ping = _sized(
        lambda n: embedding_pb2.PingRequest(payload=bytes(n), response_bytes=want), len(request)
    )
    return bytes(ping.SerializeToString())


def throughput(call: Callable[[], Any], items: int, seconds: float, clients: int) -> float:
    """Items per second with `clients` threads calling back to back for `seconds`."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        while time.perf_counter() < stop:
            call()
            done[k] += items

    wall = concurrently(worker, clients)  # before the sum: the workers fill `done`
    return sum(done) / wall


def latency(a: Callable[[], Any], b: Callable[[], Any], n: int) -> tuple[list[float], list[float]]:
    """Interleaved single-call latencies of `a` and `b`, in seconds."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(n):
        for call, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)
    return ta, tb


def compare(
    caller: Caller, request: bytes, ping: bytes, batch: int, clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Cache-hit and Ping throughput in alternating rounds (both see the same background load);
    medians reported."""
    hits, noops = [], []
    share = args.seconds / args.rounds
    for _ in range(args.rounds):
        hits.append(throughput(partial(caller.extract, request), batch, share, clients))
        noops.append(throughput(partial(caller.ping, ping), batch, share, clients))
    return {
        "cache_hit_embeddings_per_s": statistics.median(hits),
        "ping_equivalent_per_s": statistics.median(noops),
        "ratio_hit_over_ping": statistics.median(h / p for h, p in zip(hits, noops, strict=True)),
        "rounds": [[h, p] for h, p in zip(hits, noops, strict=True)],
    }


def warm(address: str, images: list[bytes]) -> dict[str, Any]:
    """Computes every image once (cache misses) and waits until the entries are committed."""
    with Client(address, timeout=600) as client:
        for i in range(0, len(images), 64):
            client.extract(images[i : i + 64], MODEL, layers="features", pooling="avg")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = client.cache_stats()
            if stats.entries >= len(images) and stats.pending_writes == 0:
                break
            time.sleep(0.05)
        check = client.extract(images[:8], MODEL, layers="features", pooling="avg")
        assert check.cached["features"].all(), "warm-up entries were not cached"
        return {"entries": int(stats.entries), "used_bytes": int(stats.used_bytes)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.split("x"))
    images = photo_jpegs(args.batch, (width, height), seed=3)
    server: ServerProcess | None = None
    if args.server:
        address = args.server
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="cache-bench-"))
        server = ServerProcess(
            data_dir, "--models", MODEL, "--cache-audit-fraction", str(args.audit_fraction)
        ).start()
        address = server.address
    clients = [int(c) for c in args.clients.split(",")]
    try:
        cache = warm(address, images)
        caller = Caller(address, args.parse)
        results: dict[str, Any] = {
            "machine": machine(),
            "input": {
                "size": args.size,
                "jpeg_bytes_mean": sum(map(len, images)) / len(images),
            },
            "clients": clients,
            "audit_fraction": None if args.server else args.audit_fraction,
            "parse_responses": args.parse,
            "cache": cache,
        }
        results["throughput"] = []
        for batch in (args.batch, 1):
            request = extract_request(images[:batch])
            raw = caller.extract_raw(request)
            check = embedding_pb2.ExtractResponse.FromString(raw)
            assert all(e.cached for item in check.items for e in item.embeddings)
            ping = equal_ping(request, raw)
            for _ in range(20):  # warm both paths
                caller.extract(request)
                caller.ping(ping)
            for n in clients:
                results["throughput"].append(
                    {
                        "batch": batch,
                        "clients": n,
                        "request_bytes": len(request),
                        "response_bytes": len(raw),
                        **compare(caller, request, ping, batch, n, args),
                    }
                )
        request = extract_request(images[:1])
        ping = equal_ping(request, caller.extract_raw(request))
        hit_s, ping_s = latency(
            lambda: caller.extract(request), lambda: caller.ping(ping), args.latency_calls
        )
        h, p = percentiles(hit_s), percentiles(ping_s)
        results["latency_1"] = {
            "cache_hit_p50_ms": h["p50"] * 1e3,
            "cache_hit_p99_ms": h["p99"] * 1e3,
            "ping_p50_ms": p["p50"] * 1e3,
            "ping_p99_ms": p["p99"] * 1e3,
            "ratio_p50": h["p50"] / p["p50"],
            "ratio_p99": h["p99"] / p["p99"],
        }
        with Client(address) as client:
            stats = client.cache_stats()
            results["server_counters"] = {"hits": stats.hits, "misses": stats.misses}
        caller.close()
        return results
    finally:
        if server is not None:
            server.stop()


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(
        f"cache-hit bench: {m['cpu']} x{m['cores']}, inputs {r['input']['size']}"
        f" JPEG ({r['input']['jpeg_bytes_mean'] / 1024:.1f} KiB)"
    )
    print(f"{'case':<22}{'cache hit':>14}{'ping (same bytes)':>20}{'ratio':>8}")
    for b in r["throughput"]:
        case = f"batch {b['batch']} x{b['clients']} emb/s"
        print(
            f"{case:<22}{b['cache_hit_embeddings_per_s']:>14,.0f}"
            f"{b['ping_equivalent_per_s']:>20,.0f}{b['ratio_hit_over_ping']:>8.2f}"
        )
    lat = r["latency_1"]
    for q in ("p50", "p99"):
        print(
            f"{'latency 1 item ' + q:<22}{lat[f'cache_hit_{q}_ms']:>11.3f} ms"
            f"{lat[f'ping_{q}_ms']:>17.3f} ms{lat[f'ratio_{q}']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="use a running server (default: start one)")
    parser.add_argument("--size", default="224x224", help="input JPEG size WxH (default 224x224)")
    parser.add_argument("--batch", type=int, default=256, help="large batch (default 256)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per throughput figure")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument(
        "--clients", default="1,2", help="concurrent callers, comma-separated (default 1,2)"
    )
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument("--parse", action="store_true", help="parse Extract responses too")
    parser.add_argument(
        "--audit-fraction",
        type=float,
        default=0.0,
        help="the started server's --cache-audit-fraction (default 0: the cache's own cost; "
        "each audited hit is recomputed by the model in the background)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args)
    print_table(results)
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
