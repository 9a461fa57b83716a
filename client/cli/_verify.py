"""`embedwarden verify IMAGES... --vectors FILE.npy --model NAME[@VERSION] [--layer L] [--pool P]
[--pipeline NAME] [--json]`: checks the vectors another pipeline made for these images."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._types import POOLINGS
from ._format import print_json, print_table
from ._inputs import collect_images

if TYPE_CHECKING:
    from .._api_verify import VerifiedVector, VerifyReport
    from .._client import Client


def _vectors(path: Path, count: int) -> np.ndarray:
    array: np.ndarray = np.load(path, allow_pickle=False)
    if array.ndim < 2 or len(array) != count:
        raise ValueError(
            f"{path}: expected one row per image ({count} rows), got an array of shape "
            f"{list(array.shape)}"
        )
    return array


def _diagnosis(item: VerifiedVector) -> str:
    matches = item.diagnosis
    if not matches:
        return "skipped (budget)" if item.diagnosis_state == "skipped_budget" else "-"
    best = matches[0]
    if best.reproduces:
        return f"{best.mistake} (cos {best.cosine:.5f})"
    closest = ", ".join(f"{m.mistake} {m.cosine:.4f}" for m in matches)
    return f"no catalogued mistake reproduces it; closest: {closest}"


def _print_report(report: VerifyReport, files: list[Path]) -> None:
    m = report.model
    print(
        f"model {m.name}@{m.version} ({m.fingerprint[:16]}), layer {report.layer}, pooling "
        f"{report.pooling}, pipeline {report.pipeline}"
    )
    print(f"tolerance: {report.tolerance}")
    rows = [
        (f.name, item.verdict, f"{item.cosine:.6f}", f"{item.max_abs_diff:.3g}", _diagnosis(item))
        for f, item in zip(files, report.items, strict=True)
    ]
    print_table(rows, ("IMAGE", "VERDICT", "COSINE", "MAX_ABS_DIFF", "DIAGNOSIS"))
    found: dict[str, int] = {}
    for item in report.items:
        if item.mistake:
            found[item.mistake] = found.get(item.mistake, 0) + 1
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(found.items(), key=lambda kv: -kv[1]))
    print(
        f"{report.verdict}: {report.failed} of {len(report.items)} failed, min cosine "
        f"{report.min_cosine:.6f}" + (f"; diagnosed: {summary}" if summary else "")
    )


def _combined(reports: list[VerifyReport]) -> VerifyReport:
    """One report over several requests (the CLI sends the images in batches)."""
    first = reports[0]
    verdicts = [r.verdict for r in reports]
    verdict = next((v for v in ("fail", "within_tolerance") if v in verdicts), first.verdict)
    return dataclasses.replace(
        first,
        verdict=verdict,
        items=tuple(item for r in reports for item in r.items),
        min_cosine=min(r.min_cosine for r in reports),
        diagnosis_seconds=sum(r.diagnosis_seconds for r in reports),
    )


def cmd_verify(args: argparse.Namespace, client: Client) -> int:
    files = collect_images(args.inputs)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    vectors = _vectors(Path(args.vectors), len(files))
    reports = [
        client.verify(
            [f.read_bytes() for f in files[start : start + args.batch_size]],
            vectors[start : start + args.batch_size],
            args.model,
            layer=args.layer or "",
            pooling=args.pool,
            normalize=args.normalize,
            pipeline=args.pipeline or "",
            diagnose=not args.no_diagnosis,
        )
        for start in range(0, len(files), args.batch_size)
    ]
    report = _combined(reports)
    if args.json:  # the report as the client returns it, each item naming its image
        data = report.as_dict()
        data["failed"] = report.failed
        for f, item in zip(files, data["items"], strict=True):
            item["image"] = str(f)
        print_json(data)
    else:
        _print_report(report, files)
    return 1 if report.failed else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="check vectors your own pipeline made against the server's reference, and name "
        "the preprocessing mistake when they differ (exit 1 when any fails)",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders (walked sorted, as extract)")
    p.add_argument(
        "--vectors", required=True, help=".npy with one row per image, in the same order"
    )
    p.add_argument("--model", required=True, help="NAME or NAME@VERSION")
    p.add_argument("--layer", help="the layer the vectors claim to be (default: the model's)")
    p.add_argument("--pool", default="default", choices=sorted(POOLINGS))
    p.add_argument("--normalize", action="store_true", help="the vectors are L2-normalised")
    p.add_argument("--pipeline", help="name of your deployment, for the server's metrics")
    p.add_argument("--no-diagnosis", action="store_true", help="verdicts only")
    p.add_argument("--batch-size", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_verify)
