"""`embedwarden parity MODEL_A MODEL_B [--layer L] [--images DIR] [--json]`."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ._inputs import collect_images, read_texts

if TYPE_CHECKING:
    from .._client import Client


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if value == value else "nan"  # noqa: PLR0124 - NaN check


def cmd_parity(args: argparse.Namespace, client: Client) -> int:

    images = collect_images(args.images) if args.images else None
    if images is not None and not images:
        raise FileNotFoundError(f"no image files in {', '.join(args.images)}")
    texts = read_texts(args) or None
    report = client.compare_models(
        args.model_a, args.model_b, layers=args.layer, images=images, texts=texts
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        return 0
    a, b = report.model_a, report.model_b
    source = (
        f"{len(images)} images" if images else f"{len(texts)} texts" if texts else "the canaries"
    )
    print(f"A  {a.name}@{a.version}  {a.fingerprint[:16]}")
    print(f"B  {b.name}@{b.version}  {b.fingerprint[:16]}")
    print(f"inputs: {report.inputs} ({source}); arrays compared channels-last")
    print(f"preprocessed input (tokens for text)  max |A-B| {_num(report.preprocess_max_abs_diff)}")
    header = ("LAYER", "MAX_ABS_DIFF", "MIN_COS", "MEAN_COS", "TOP1", "TOP10_OVERLAP")
    rows = [
        (
            p.layer,
            _num(p.max_abs_diff),
            f"{p.min_cosine:.7f}",
            f"{p.mean_cosine:.7f}",
            f"{p.top1_agreement:.2f}" if p.top1_agreement >= 0 else "-",
            f"{p.retrieval_overlap:.3f} (min {p.retrieval_min_overlap:.1f})"
            if p.retrieval_overlap >= 0
            else "-",
        )
        for p in report.layers
    ]
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    where = report.first_divergence or "nowhere (within float rounding at every stage)"
    print(f"first divergence: {where}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "parity",
        help="run the same images through two loaded models and report where they differ",
    )
    p.add_argument("model_a", help="NAME or NAME@VERSION")
    p.add_argument("model_b", help="NAME or NAME@VERSION")
    p.add_argument(
        "--layer", action="append", help="layer in both catalogues (repeat; default: all shared)"
    )
    p.add_argument(
        "--images",
        action="append",
        help="image file or folder, walked recursively (repeatable; default: canary photos)",
    )
    p.add_argument("--text", action="append", help="a text, for text models (repeatable)")
    p.add_argument("--text-file", action="append", help="UTF-8 file of texts, one per line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_parity)
