"""The benchmark suite, one command: `python bench/run.py [--quick]`.

Runs every benchmark in its own process (each starts its own server), then writes to
bench/results/<UTC time>/: results.json (everything), table.md (the summary, as in the README)
and throughput.png (images/s against concurrent clients, server vs in-process). Every figure is a
ratio against a baseline measured in the same run on the same machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_bench(script: str, out: Path, *args: str) -> dict[str, Any]:
    """Runs bench/<script> with --json and returns its results (empty on failure)."""
    target = out / f"{Path(script).stem}.json"
    cmd = [sys.executable, str(HERE / script), "--json", str(target), *args]
    print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with (out / f"{Path(script).stem}.log").open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not target.exists():
        print(f"   {script} failed (exit {code}); see its .log", file=sys.stderr)
        return {}
    return json.loads(target.read_text())


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def table(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    rows = [
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"GPU: {m.get('gpu') or 'none'}; {r['started']}",
        "",
        "| Benchmark | Embedwarden | Baseline (same run) | Ratio | Target |",
        "| --- | --- | --- | --- | --- |",
    ]
    x = r.get("extract", {})
    if x:
        best = x["in_process"]["best_throughput"]
        best_cfg = x["in_process"]["best"]
        for per in (8, 1):
            for n, v in x[f"throughput_{per}_per_request"].items():
                target = {(1, 1): "≥ 0.95", (8, 1): "≥ 0.85"}.get((per, int(n)), "")
                rows.append(
                    f"| cache-miss images/s, {n} client(s), {per} image(s)/request | {_f(v)} | "
                    f"{_f(best)} in-process ({best_cfg}) | {v / best:.2f}x | {target} |"
                )
        single = x["in_process"].get("best_single")
        if single:
            v = x["throughput_1_per_request"]["1"]
            rows.append(
                "| same, 1 client, 1 image/request, like for like | "
                f"{_f(v)} | {_f(x['in_process']['throughput'][single])} in-process one image "
                f"at a time ({single}) | {x['ratio_1_per_request_vs_single']:.2f}x | |"
            )
        limit = x.get("side_by_side")
        if limit:
            for per in (1, 8):
                v = x[f"throughput_{per}_per_request"]["8"]
                rows.append(
                    f"| cache-miss images/s, 8 client(s), {per} image(s)/request | {_f(v)} | "
                    f"{_f(limit['images_per_s'])} from {limit['workers']} single-threaded "
                    f"in-process workers side by side (batch {limit['batch']}) | "
                    f"{v / limit['images_per_s']:.2f}x | ≥ 0.9 |"
                )
        lat, tuned = x["latency"], x["latency_tuned"]
        in_lat = x["in_process"]["latency"]
        rows.append(
            f"| cache-miss latency, 1 image, p50 / p99 ms | {_f(lat['p50'] * 1e3)} / "
            f"{_f(lat['p99'] * 1e3)} (throughput config) | {_f(in_lat['p50'] * 1e3)} / "
            f"{_f(in_lat['p99'] * 1e3)} in-process | {x['latency_overhead_p50_ms']:+.1f} ms | |"
        )
        stages, in_stages = lat.get("stages"), x["in_process"].get("stages")
        if stages and in_stages:
            rows.append(
                "| where the lone request's time goes, medians ms | "
                f"preprocess {_f(stages['preprocess'])}, queue {_f(stages['queue'])}, "
                f"inference {_f(stages['inference'])}, cache {_f(stages['cache'])}, "
                f"handoffs {_f(stages['handoffs'])}, rpc {_f(stages['rpc'])} | "
                f"preprocess {_f(in_stages['preprocess'])}, inference "
                f"{_f(in_stages['inference'])} in-process | | |"
            )
        floor = x.get("ping_floor")
        if floor:
            rows.append(
                "| transport alone: no-op Ping of a lone request's sizes, p50 ms | "
                f"{_f(floor['after_idle_ms'], 2)} after {_f(floor['idle_ms'], 0)} ms idle | "
                f"{_f(floor['hot_ms'], 2)} back to back | | |"
            )
        rows.append(
            f"| same, latency config (1 lane x all cores) | {_f(tuned['p50'] * 1e3)} / "
            f"{_f(tuned['p99'] * 1e3)} | same | {x['latency_tuned_overhead_p50_ms']:+.1f} ms | "
            "≤ +2 ms |"
        )
        s = x["stream"]
        rows.append(
            f"| ExtractStream images/s (chunks of 16) | {_f(s['stream_images_per_s'])} | "
            f"{_f(s['unary_images_per_s'])} unary Extract | {s['ratio']:.2f}x | |"
        )
    c = r.get("cache", {})
    for case in sorted(c.get("throughput", []), key=lambda t: (-t["batch"], t["clients"])):
        size = case["batch"]
        rows.append(
            f"| cache-hit embeddings/s, batches of {size}, {case['clients']} client(s) "
            f"({c['input']['size']} JPEG) | {_f(case['cache_hit_embeddings_per_s'], 0)} | "
            f"{_f(case['ping_equivalent_per_s'], 0)} no-op Ping, same bytes | "
            f"{case['ratio_hit_over_ping']:.2f}x | "
            f"{'≥ 0.8' if (size, case['clients']) == (256, 1) else ''} |"
        )
    lat = c.get("latency_1")
    if lat:
        rows.append(
            f"| cache-hit latency, 1 item, p50 / p99 ms | {lat['cache_hit_p50_ms']:.2f} / "
            f"{lat['cache_hit_p99_ms']:.2f} | {lat['ping_p50_ms']:.2f} / "
            f"{lat['ping_p99_ms']:.2f} Ping | {lat['ratio_p50']:.2f}x | ≤ 1.3x |"
        )
    index = r.get("index") or {}
    n = (index.get("config") or {}).get("n", "?")
    for kind, k in (index.get("results") or {}).items():
        rows.append(
            f"| search queries/s, {kind}, {n} x 1280, batches of 64 | {_f(k['server_qps'], 0)} | "
            f"{_f(k['inprocess_qps'], 0)} in-process FAISS, same index | "
            f"{k['server_qps'] / k['inprocess_qps']:.2f}x | "
            f"{'≥ 0.8, ' if kind == 'hnsw' else ''}recall@10 {k['recall_at_10']:.3f} |"
        )
        b = k.get("per_batch_ms")
        if b:
            rows.append(
                f"| same, one batch, median ms | {_f(b['server'], 2)} | {_f(b['inprocess'], 2)} "
                f"in-process; a no-op Ping of the same bytes {_f(b['ping'], 2)} | "
                f"{b['inprocess'] / b['server']:.2f}x (FAISS + Ping alone: {b['ceiling']:.2f}x) | |"
            )
        if b and "inprocess_after_rpc" in b:
            after = b["inprocess_after_rpc"]
            rows.append(
                f"| same, in-process FAISS timed right after a no-op Ping, median ms | "
                f"{_f(b['server'], 2)} | {_f(after, 2)} (back to back {_f(b['inprocess'], 2)}) | "
                f"{(after + b['ping']) / b['server']:.2f}x (that + Ping) | |"
            )
    v = r.get("verify", {})
    if v:
        rows.append(
            f"| Extract p50 / p99 ms, 1 image, during a {v['verify_items']}-item failing Verify | "
            f"{_f(v['extract_during_verify']['p50'] * 1e3)} / "
            f"{_f(v['extract_during_verify']['p99'] * 1e3)} | "
            f"{_f(v['extract_idle']['p50'] * 1e3)} / {_f(v['extract_idle']['p99'] * 1e3)} idle | "
            f"{v['p50_ratio']:.2f}x / {v['p99_ratio']:.2f}x | ≤ 2x |"
        )
    s = r.get("startup", {})
    if s:
        rows.append(
            f"| cold start to SERVING (records golden) / restart (checks golden) | "
            f"{s['cold_start_s']:.1f} s / {s['warm_restart_s']:.1f} s | | | |"
        )
        for name, mib in s["per_model_rss_mib"].items():
            rows.append(
                f"| resident memory of {name} | +{mib:.0f} MiB | server with no model "
                f"{s['base_rss_mib']:.0f} MiB | | |"
            )
    return "\n".join(rows) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    x = r.get("extract")
    if not x:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for per, style in ((8, "o-"), (1, "s--")):
        points = x[f"throughput_{per}_per_request"]
        clients = [int(n) for n in points]
        ax.plot(clients, list(points.values()), style, label=f"server, {per} image(s)/request")
    ax.axhline(
        x["in_process"]["best_throughput"],
        color="gray",
        linestyle=":",
        label=f"in-process best ({x['in_process']['best']})",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images/s (cache misses, 640x480 JPEG)")
    ax.set_title("efficientnet_lite0: server vs in-process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--skip", default="", help="comma-separated: extract,cache,index,verify,startup"
    )
    args = parser.parse_args()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / stamp
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    quick = ["--quick"] if args.quick else []
    r: dict[str, Any] = {"started": stamp}
    data = out / "data"
    if "extract" not in skip:
        r["extract"] = run_bench(
            "extract_bench.py",
            out,
            "--data-dir",
            str(data / "extract"),
            "--seconds",
            "5" if args.quick else "10",
            *quick,
        )
        r["machine"] = r["extract"].get("machine", {})
    if "cache" not in skip:
        r["cache"] = run_bench(
            "cache_bench.py",
            out,
            *(["--seconds", "2", "--rounds", "1", "--latency-calls", "300"] if args.quick else []),
        )
    if "index" not in skip:
        r["index"] = run_bench(
            "index_bench.py",
            out,
            "--kinds",
            "flat,hnsw",
            *(["--n", "20000", "--queries", "128", "--seconds", "2"] if args.quick else []),
        )
    if "verify" not in skip:
        r["verify"] = run_bench("verify_bench.py", out)
    if "startup" not in skip:
        r["startup"] = run_bench("startup_bench.py", out, "--data-dir", str(data / "startup"))
        r.setdefault("machine", r["startup"].get("machine", {}))
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    text = table(r)
    (out / "table.md").write_text(text)
    plot(r, out / "throughput.png")
    print(text)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
