"""`embedwarden cache stats|purge|verify`.

`stats` and `purge` talk to a running server; `verify` reads a cache directory offline (it needs
the server extra, and is safe beside a running server: LMDB readers never block writers).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ._format import human_bytes, message_dict, print_json

if TYPE_CHECKING:
    from .._client import Client


def cmd_stats(args: argparse.Namespace, client: Client) -> int:
    stats = client.cache_stats()
    if args.json:
        print_json(message_dict(stats))
        return 0
    if not stats.enabled:
        print("the cache is disabled on this server (--cache false)")
        return 0
    lookups = stats.hits + stats.misses + stats.corrupt
    rate = f" ({100 * stats.hits / lookups:.1f}% hits)" if lookups else ""
    print(f"path         {stats.path}")
    print(f"entries      {stats.entries}")
    print(f"used         {human_bytes(stats.used_bytes)} of {human_bytes(stats.max_bytes)}")
    print(f"lookups      {stats.hits} hits, {stats.misses} misses, {stats.corrupt} corrupt{rate}")
    print(f"evictions    {stats.evictions}")
    print(f"queued       {stats.pending_writes} writes")
    for m in stats.models:
        print(f"  {m.model or '(unregistered)':<28} {m.fingerprint[:16]}  {m.entries} entries")
    return 0


def cmd_purge(args: argparse.Namespace, client: Client) -> int:
    removed = client.purge_cache(args.model)
    what = f"of {args.model}" if args.model else "(all versions)"
    print(f"removed {removed} entries {what}")
    return 0


def cmd_verify(args: argparse.Namespace, client: Any) -> int:
    try:
        from embedwarden.server import parse_settings
        from embedwarden.server.cache import verify_cache
    except ImportError as exc:
        print(f"cache verify needs the server extra ({exc})", file=sys.stderr)
        return 2
    # The server's own resolution: --data-dir, else EMBEDWARDEN_DATA_DIR, else the XDG default.
    path = parse_settings(["--data-dir", args.data_dir] if args.data_dir else []).cache_dir
    try:
        report = verify_cache(path)
    except Exception as exc:  # the server's typed errors, or LMDB's
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"path": str(path), "passed": report.passed, **vars(report)}, indent=2))
    else:
        print(f"{path}: {report.entries} entries, {report.ok} pass their checksum")
        for line in report.corrupt:
            print(f"  corrupt: {line}")
        for line in report.problems:
            print(f"  bookkeeping: {line}")
    return 0 if report.passed else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="the server's embedding cache: stats, purge, verify")
    cache = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    s = cache.add_parser("stats", help="entries, size, hits and misses, entries per version")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=cmd_stats)

    s = cache.add_parser("purge", help="delete every entry, or one model version's (admin)")
    s.add_argument("--model", default=None, help="only this version's entries: NAME@VERSION")
    s.set_defaults(handler=cmd_purge)

    s = cache.add_parser(
        "verify", help="offline: check every entry's checksum and the bookkeeping (exit 1 if bad)"
    )
    s.add_argument("--data-dir", default=None, help="the server's --data-dir (default: as serve)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=cmd_verify, offline=True)
