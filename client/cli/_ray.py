"""`embedwarden extract ... --ray ADDRESS --out DIR` and `embedwarden verify-parquet DIR`: bulk
extraction on a Ray cluster into Parquet (needs the `ray` extra: pip install 'embedwarden[ray]')."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _progress() -> Callable[[int, int, float | None], None]:
    last = [0.0]

    def show(done: int, total: int, rate: float | None) -> None:
        """`rate`: images/s since the first batch arrived (None until a second one did)."""
        now = time.monotonic()
        if now - last[0] < 1.0 and done < total:
            return
        last[0] = now
        end = "\n" if done >= total else ""
        speed = f", {rate:.1f} images/s" if rate is not None else ""
        print(f"\r{done}/{total} inputs{speed}", end=end, file=sys.stderr)

    return show


def cmd_extract_ray(args: argparse.Namespace) -> int:
    try:
        from embedwarden.ray import ClusterError, OutputError, extract_to_parquet
        from embedwarden.server import EmbedwardenError
    except ImportError as exc:
        print(f"--ray needs the ray extra: pip install 'embedwarden[ray]' ({exc})", file=sys.stderr)
        return 2
    layers = args.layer or []
    if len(layers) > 1:
        print("--ray writes one layer per output folder: give one --layer", file=sys.stderr)
        return 2
    try:
        summary = extract_to_parquet(
            args.inputs,
            args.model,
            Path(args.out),
            layer=layers[0] if layers else "",
            pooling=args.pool,
            dtype=args.dtype,
            address=args.ray,
            actors=args.actors,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            models_dirs=tuple(args.models_dir or ()),
            expect_fingerprint=args.expect_fingerprint,
            progress=_progress(),
        )
    except (ClusterError, OutputError, EmbedwardenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.describe(), file=sys.stderr)
    return 0 if summary.verdict is not None and summary.verdict.ok else 1


def cmd_verify(args: argparse.Namespace, client: None) -> int:
    try:
        from embedwarden.ray import OutputError, verify
    except ImportError as exc:
        print(f"verify-parquet needs the ray extra ({exc})", file=sys.stderr)
        return 2
    try:
        verdict = verify(Path(args.folder))
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(("complete: " if verdict.ok else "INCOMPLETE: ") + verdict.describe())
    return 0 if verdict.ok else 1


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    """The `extract` flags of the Ray form."""
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run on the Ray cluster at ADDRESS (auto, HOST:PORT); --out is then a folder "
        "that receives a Parquet dataset",
    )
    p.add_argument("--actors", type=int, default=2, help="--ray: model actors (default 2)")
    p.add_argument("--data-dir", type=Path, default=None, help="--ray: where golden records live")
    p.add_argument("--models-dir", type=Path, action="append", help="--ray: extra manifests")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify-parquet", help="check a bulk output: one fingerprint, every input accounted for"
    )
    p.add_argument("folder")
    p.set_defaults(handler=cmd_verify, offline=True)
