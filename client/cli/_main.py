"""The `embedwarden` command line.

The server address comes from `--server`, else `EMBEDWARDEN_SERVER`, else 127.0.0.1:50051.
`embedwarden serve ...` starts a server (needs the `server` extra); `manifest` and `token` work
offline (`_offline`); every other command is a client of a running server. One module per
group of commands, each with a `register` that adds its subcommands. `--json` prints
machine-readable output where offered.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .._base import default_address
from .._client import Client
from .._exceptions import EmbedwardenError
from . import _cache, _check, _index, _models, _offline, _parity, _ray, _verify

# Each entry adds its subcommands; feature modules append theirs here.
REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _models.register,
    _offline.register_manifest,
    _offline.register_token,
    _cache.register,
    _index.register,
    _check.register,
    _parity.register,
    _verify.register,
    _ray.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedwarden", description="Pinned, verified embeddings of pretrained backbones."
    )
    parser.add_argument(
        "--server",
        default=None,
        help=f"server address (default $EMBEDWARDEN_SERVER or {default_address()})",
    )
    parser.add_argument("--token", default=None, help="bearer token (default $EMBEDWARDEN_TOKEN)")
    parser.add_argument("--ca", type=Path, default=None, help="CA certificate: connect with TLS")
    parser.add_argument("--cert", type=Path, default=None, help="client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, default=None, help="client private key (mutual TLS)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-call deadline, seconds")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="start a server (flags: embedwarden serve --help)", add_help=False)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        try:
            from embedwarden.server import main as serve_main
        except ImportError as exc:
            print(
                f"embedwarden serve needs the server extra: pip install 'embedwarden[server]' "
                f"({exc})",
                file=sys.stderr,
            )
            return 2
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    root = args.ca.read_bytes() if args.ca else None
    chain = args.cert.read_bytes() if args.cert else None
    key = args.key.read_bytes() if args.key else None
    try:
        if getattr(args, "offline", False):
            return int(args.handler(args, None))
        with Client(
            args.server,
            token=args.token,
            timeout=args.timeout,
            root_certificates=root,
            certificate_chain=chain,
            private_key=key,
        ) as client:
            return int(args.handler(args, client))
    except EmbedwardenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
