"""`embedwarden check [--model M] [--layers] [--json]`: run the consistency checks now.

The table shows one row per check and model (worst layer) plus every failing layer; `--layers`
shows every layer. Exit code 1 when any check failed.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import TYPE_CHECKING

from embedwarden.v1 import admin_pb2

from ._format import message_dict, print_json

if TYPE_CHECKING:
    from .._client import Client


def _number(x: float) -> str:
    if math.isnan(x):
        return "-"
    return "0" if x == 0 else f"{x:.3g}"


def _cosine(x: float) -> str:
    if math.isnan(x):
        return "-"
    if x == 1:
        return "1"
    return f"1-{1 - x:.2g}" if x > 0.99 else f"{x:.4f}"


def _tolerance(r: admin_pb2.CheckResult) -> str:
    if r.tolerance_abs == 0 and r.tolerance_rel == 0:
        return "exact"
    return f"{r.tolerance_abs:g}+{r.tolerance_rel:g}|ref|"


def _age(checked_at: float, now: float) -> str:
    seconds = max(0.0, now - checked_at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render(response: admin_pb2.CheckConsistencyResponse, layers: bool) -> list[str]:
    """The report as text lines: a table, then the detail of each summary or failing row."""
    now = time.time()
    shown = [r for r in response.results if layers or not r.layer or not r.passed]
    header = ("MODEL", "CHECK", "LAYER", "RESULT", "MAX|d|", "MIN COS", "TOLERANCE", "CHECKED")
    cells = [header] + [
        (
            f"{r.model.name}@{r.model.version}",
            r.check,
            r.layer or "-",
            "ok" if r.passed else "FAIL",
            _number(r.max_abs_diff),
            _cosine(r.min_cosine),
            _tolerance(r),
            _age(r.checked_at, now),
        )
        for r in shown
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    notes = [r for r in shown if r.detail and (not r.layer or not r.passed)]
    if notes:
        lines.append("")
        for r in notes:
            where = f"{r.check}/{r.layer}" if r.layer else r.check
            lines.append(f"{r.model.name}@{r.model.version} {where}: {r.detail}")
    failed = sum(not r.passed for r in response.results)
    lines.append("")
    if not response.results:
        lines.append("no model is loaded: nothing to check")
    elif failed:
        lines.append(f"{failed} of {len(response.results)} checks FAILED")
    else:
        lines.append(f"all {len(response.results)} checks passed")
    return lines


def cmd_check(args: argparse.Namespace, client: Client) -> int:
    response = client.check_consistency(args.model)
    if args.json:
        print_json(message_dict(response))
    else:
        print("\n".join(render(response, args.layers)))
    return 0 if response.passed else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check", help="run the consistency checks now and report them (exit 1 on any failure)"
    )
    p.add_argument("--model", default=None, help="NAME or NAME@VERSION (default: every model)")
    p.add_argument("--layers", action="store_true", help="show every layer, not only failures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_check)
