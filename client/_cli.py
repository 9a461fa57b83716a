"""The `embedwarden` command line.

The server address comes from `--server`, else `EMBEDWARDEN_SERVER`, else 127.0.0.1:50051.
`embedwarden serve ...` starts a server (needs the `server` extra); every other command is a
client of a running server. `--json` prints machine-readable output where offered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _cli_cache, _cli_check, _cli_index, _cli_parity
from ._client import POOLINGS, Client, default_address
from ._exceptions import EmbedwardenError
from ._format import Progress, message_dict, print_json, print_table

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def collect_images(paths: Sequence[str]) -> list[Path]:
    """Named files as given; folders walked recursively for image files, sorted by path."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(
                sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")
    return out


# --- commands --------------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace, client: Client) -> int:
    files = collect_images(args.inputs)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    progress = Progress(len(files), "extract", enabled=len(files) > args.batch_size)
    per_layer: dict[str, list[np.ndarray]] = {}
    identity = None

    def reads() -> Iterator[bytes]:
        for f in files:
            yield f.read_bytes()

    for chunk in client.extract_stream(
        reads(),
        args.model,
        batch_size=args.batch_size,
        layers=args.layer,
        pooling=args.pool,
        dtype=args.dtype,
        normalize=args.normalize,
        cache=args.cache,
    ):
        identity = chunk.model
        for layer, array in chunk.arrays.items():
            per_layer.setdefault(layer, []).append(array)
        progress.advance(len(next(iter(chunk.arrays.values()))))
    arrays = {layer: np.concatenate(parts) for layer, parts in per_layer.items()}
    out = Path(args.out)
    if len(arrays) == 1:
        np.save(out, next(iter(arrays.values())))
    else:
        np.savez(out, **arrays)  # type: ignore[arg-type]
    sidecar = out.with_suffix(".json")
    assert identity is not None
    meta = {
        "model": identity.name,
        "version": identity.version,
        "fingerprint": identity.fingerprint,
        "weights_sha256": identity.weights_sha256,
        "layers": {layer: list(a.shape) for layer, a in arrays.items()},
        "pooling": args.pool,
        "dtype": args.dtype,
        "normalize": args.normalize,
        "inputs": [str(f) for f in files],
    }
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items())
    print(
        f"{out}: {shapes} from {identity.name}@{identity.version} "
        f"(fingerprint {identity.fingerprint[:16]}); provenance in {sidecar}",
        file=sys.stderr,
    )
    return 0


def cmd_models(args: argparse.Namespace, client: Client) -> int:
    models = client.list_models()
    if args.json:
        print_json([message_dict(m) for m in models])
        return 0
    rows = [
        (
            f"{m.identity.name}@{m.identity.version}",
            "yes" if m.is_default_version else "",
            m.framework,
            m.architecture,
            m.default_layer,
            _state_name(m.state),
            m.identity.fingerprint[:16],
        )
        for m in models
    ]
    print_table(
        rows, ("MODEL", "DEFAULT", "FRAMEWORK", "ARCHITECTURE", "LAYER", "STATE", "FINGERPRINT")
    )
    return 0


def _state_name(state: int) -> str:
    from embedwarden.v1 import embedding_pb2

    name = embedding_pb2.ModelState.Name(embedding_pb2.ModelState.ValueType(state))
    return str(name).removeprefix("MODEL_STATE_").lower()


def cmd_describe(args: argparse.Namespace, client: Client) -> int:
    info = client.describe_model(args.model)
    if args.json:
        print_json(message_dict(info))
        return 0
    s = info.summary
    p = info.preprocessing
    print(
        f"{s.identity.name}@{s.identity.version}  ({_state_name(s.state)}"
        f"{': ' + s.state_detail if s.state_detail else ''})"
    )
    print(f"  fingerprint     {s.identity.fingerprint}")
    print(f"  weights         {info.weights_file}  sha256 {s.identity.weights_sha256}")
    print(
        f"  architecture    {s.framework}:{s.architecture}  dtype {info.dtype}  "
        f"deterministic {info.deterministic}  device {info.device}"
    )
    geometry = {
        "crop_resize": f"crop {p.crop_fraction:g} of short side -> {p.size}",
        "resize_crop": f"short side {p.resize_size} -> centre crop {p.size}",
        "resize": f"resize to {p.size}x{p.size}",
    }.get(p.resize_mode, p.resize_mode)
    print(
        f"  preprocessing   {p.decoder} {p.color_order} {geometry} {p.interpolation} "
        f"antialias={p.antialias} (x/{p.divisor:g} - {list(p.mean)}) / {list(p.std)} "
        f"{p.layout}"
    )
    if info.description:
        print(f"  description     {info.description}")
    print("  layers:")
    for layer in info.layers:
        mark = " (default)" if layer.name == s.default_layer else ""
        print(f"    {layer.name:<12} {list(layer.shape)!s:<18} {layer.layout}{mark}")
    return 0


def cmd_load(args: argparse.Namespace, client: Client) -> int:
    response = client.load_model(args.model)
    ident = response.model.identity
    print(
        f"{ident.name}@{ident.version} serving (loaded in {response.load_seconds:.2f}s, "
        f"fingerprint {ident.fingerprint[:16]})"
    )
    return 0


def cmd_unload(args: argparse.Namespace, client: Client) -> int:
    ident = client.unload_model(args.model).model
    print(f"{ident.name}@{ident.version} unloaded")
    return 0


def _register_core(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("extract", help="embed image files into a .npy (rows in input order)")
    p.add_argument("inputs", nargs="+", help="image files or folders (walked recursively)")
    p.add_argument("--model", required=True, help="NAME or NAME@VERSION")
    p.add_argument("--layer", action="append", help="layer (repeat for several: .npz output)")
    p.add_argument("--pool", default="default", choices=sorted(POOLINGS))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--cache", default="on", choices=("on", "off", "refresh"))
    p.add_argument("--batch-size", type=int, default=32, help="inputs per stream message")
    p.add_argument("--out", required=True, help="output .npy (.npz for several layers)")
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("models", help="list registered model versions and their state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("describe", help="show a model version's pinned manifest")
    p.add_argument("model", help="NAME or NAME@VERSION")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_describe)

    p = sub.add_parser("load", help="load a model version (admin)")
    p.add_argument("model", help="NAME or NAME@VERSION")
    p.set_defaults(handler=cmd_load)

    p = sub.add_parser("unload", help="unload a model version; in-flight requests finish (admin)")
    p.add_argument("model", help="NAME or NAME@VERSION")
    p.set_defaults(handler=cmd_unload)


def cmd_manifest(args: argparse.Namespace, client: Client | None) -> int:
    try:
        from embedwarden.server import EmbedwardenError as ServerError
        from embedwarden.server._manifest_tools import torchvision_manifest
    except ImportError as exc:
        print(f"manifest generation needs the server extra ({exc})", file=sys.stderr)
        return 2
    try:
        if args.framework == "keras":  # imports TensorFlow: only here
            from embedwarden.server.backbones._keras_manifest import keras_manifest

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


def _register_manifest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def cmd_token(args: argparse.Namespace, client: Client | None) -> int:
    try:
        from embedwarden.server._security import new_token
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


def _register_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("token", help="create bearer tokens (server side, offline)")
    p.add_argument("action", choices=("new",))
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True, choices=("reader", "writer", "admin"))
    p.add_argument("--tokens-file", type=Path, required=True)
    p.set_defaults(handler=cmd_token, offline=True)


# Each entry adds its subcommands; feature modules append theirs here.
REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _register_core,
    _register_manifest,
    _register_token,
    _cli_cache.register,
    _cli_index.register,
    _cli_check.register,
    _cli_parity.register,
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
            from embedwarden.server._main import main as serve_main
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
