"""`embedwarden manifest|token`: server-side tools that need no running server (and the server
extra, imported only when the command runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_manifest(args: argparse.Namespace, client: None) -> int:
    try:
        from embedwarden.server import EmbedwardenError as ServerError
        from embedwarden.server.backbones import torchvision_manifest
    except ImportError as exc:
        print(f"manifest generation needs the server extra ({exc})", file=sys.stderr)
        return 2
    try:
        if args.framework == "keras":  # imports TensorFlow: only here
            from embedwarden.server.backbones import keras_manifest

            text = keras_manifest(
                args.arch,
                Path(args.weights),
                name=args.name,
                version=args.version,
                size=args.size,
                options=dict(args.option or ()),
            )
        else:
            text = torchvision_manifest(
                args.arch,
                args.weights,
                weights_file=args.weights_file,
                name=args.name,
                version=args.version,
            )
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _key_value(text: str) -> tuple[str, Any]:
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.strip(), value


def register_manifest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "manifest", help="write a manifest for a torchvision or keras.applications model (offline)"
    )
    p.add_argument("framework", choices=("torchvision", "keras"))
    p.add_argument("arch", help="model name, e.g. resnet50 (torchvision), MobileNetV2 (keras)")
    p.add_argument(
        "weights",
        help="torchvision: weights entry, e.g. IMAGENET1K_V2; keras: the weights file (a path, "
        "or a file name in $KERAS_HOME/models)",
    )
    p.add_argument(
        "--weights-file",
        type=Path,
        default=None,
        help="torchvision: the .pth file (default: the torch hub cache)",
    )
    p.add_argument("--size", type=int, default=None, help="keras: input size (default: its own)")
    p.add_argument(
        "--option",
        type=_key_value,
        action="append",
        help="keras: constructor option KEY=VALUE (TOML value, e.g. alpha=0.35; repeatable)",
    )
    p.add_argument("--name", default=None, help="model name (default: the architecture)")
    p.add_argument("--version", default="1")
    p.add_argument("--out", default=None, help="write to this file (default: stdout)")
    p.set_defaults(handler=cmd_manifest, offline=True)


def cmd_token(args: argparse.Namespace, client: None) -> int:
    try:
        from embedwarden.server.rpc import new_token
    except ImportError as exc:
        print(f"token management needs the server extra ({exc})", file=sys.stderr)
        return 2
    token = new_token(args.tokens_file, args.name, args.role)
    print(token)
    print(
        f"added {args.role} token {args.name!r} to {args.tokens_file} (only its SHA-256 is "
        "stored; keep the token above, it is not shown again)",
        file=sys.stderr,
    )
    return 0


def register_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("token", help="create bearer tokens (server side, offline)")
    p.add_argument("action", choices=("new",))
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True, choices=("reader", "writer", "admin"))
    p.add_argument("--tokens-file", type=Path, required=True)
    p.set_defaults(handler=cmd_token, offline=True)
