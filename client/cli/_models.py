"""`embedwarden extract|models|describe|load|unload`: embeddings and model versions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .._client import Client
from .._types import POOLINGS, Text
from . import _ray
from ._format import Progress, message_dict, print_json, print_table
from ._inputs import collect_images, read_texts


def cmd_extract(args: argparse.Namespace, client: Client) -> int:
    if args.ray:
        return _ray.cmd_extract_ray(args)
    texts = read_texts(args)
    if texts and args.inputs:
        print("give image files or --text/--text-file, not both", file=sys.stderr)
        return 2
    files = [] if texts else collect_images(args.inputs)
    if not files and not texts:
        print("no image files found (or texts given)", file=sys.stderr)
        return 2
    count = len(texts) or len(files)
    progress = Progress(count, "extract", enabled=count > args.batch_size)
    per_layer: dict[str, list[np.ndarray]] = {}
    identity = None

    def reads() -> Iterator[bytes | Text]:
        yield from (Text(t) for t in texts)
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
        expect_fingerprint=args.expect_fingerprint,
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
        "inputs": [str(f) for f in files] if files else texts,
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
    info = client.describe_model(args.model, expect_fingerprint=args.expect_fingerprint)
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
    if info.HasField("tokenization"):
        t = info.tokenization
        print(
            f"  tokenization    lowercase={t.lowercase} max_length={t.max_length} truncation "
            f"{t.truncation_side}; pooled: {t.pooling}{' + L2' if t.normalize else ''}; "
            f"{len(t.files)} files pinned"
        )
    else:
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
        d = p.decoding
        print(
            f"  decoding        {','.join(d.formats)}; exif {d.exif}, icc {d.icc}, alpha {d.alpha}"
            f"{' on ' + str(list(d.background)) if d.alpha == 'composite' else ''}, 16-bit "
            f"{d.sixteen_bit}, frames {d.frames}"
        )
    if info.description:
        print(f"  description     {info.description}")
    print("  layers:")
    for layer in info.layers:
        mark = " (default)" if layer.name == s.default_layer else ""
        print(f"    {layer.name:<12} {list(layer.shape)!s:<18} {layer.layout}{mark}")
    return 0


def cmd_load(args: argparse.Namespace, client: Client) -> int:
    response = client.load_model(args.model, expect_fingerprint=args.expect_fingerprint)
    ident = response.model.identity
    print(
        f"{ident.name}@{ident.version} serving (loaded in {response.load_seconds:.2f}s, "
        f"fingerprint {ident.fingerprint[:16]})"
    )
    return 0


def cmd_unload(args: argparse.Namespace, client: Client) -> int:
    ident = client.unload_model(args.model, expect_fingerprint=args.expect_fingerprint).model
    print(f"{ident.name}@{ident.version} unloaded")
    return 0


def add_expect_fingerprint(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expect-fingerprint",
        default="",
        metavar="HEX",
        help="pin the model version's fingerprint: a server with another one refuses",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("extract", help="embed image files into a .npy (rows in input order)")
    p.add_argument("inputs", nargs="*", help="image files or folders (walked recursively)")
    p.add_argument("--text", action="append", help="a text, for text models (repeatable)")
    p.add_argument("--text-file", action="append", help="UTF-8 file of texts, one per line")
    p.add_argument("--model", required=True, help="NAME or NAME@VERSION")
    p.add_argument("--layer", action="append", help="layer (repeat for several: .npz output)")
    p.add_argument("--pool", default="default", choices=sorted(POOLINGS))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--cache", default="on", choices=("on", "off", "refresh"))
    p.add_argument("--batch-size", type=int, default=32, help="inputs per stream message")
    p.add_argument("--out", required=True, help="output .npy (.npz for several layers)")
    add_expect_fingerprint(p)
    _ray.add_extract_arguments(p)
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("models", help="list registered model versions and their state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("describe", help="show a model version's pinned manifest")
    p.add_argument("model", help="NAME or NAME@VERSION")
    p.add_argument("--json", action="store_true")
    add_expect_fingerprint(p)
    p.set_defaults(handler=cmd_describe)

    p = sub.add_parser("load", help="load a model version (admin)")
    p.add_argument("model", help="NAME or NAME@VERSION")
    add_expect_fingerprint(p)
    p.set_defaults(handler=cmd_load)

    p = sub.add_parser("unload", help="unload a model version; in-flight requests finish (admin)")
    p.add_argument("model", help="NAME or NAME@VERSION")
    add_expect_fingerprint(p)
    p.set_defaults(handler=cmd_unload)
