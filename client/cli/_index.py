"""`embedwarden index ...`: collections for similarity search.

index create NAME --model M[@V] [--layer L] [--metric cosine|ip|l2] [--kind flat|hnsw|ivf]
index add NAME FILES_OR_DIRS... [--ids-from path|stem]  |  index add NAME --text-file F [--text T]
index search NAME QUERY_FILE [-k 10] [--json]  |  index search NAME --text "..." [-k 10]
index list | describe NAME | remove NAME IDS... | drop NAME
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .._api_index import KINDS, METRICS, CollectionInfo
from ._format import Progress, human_bytes, print_json, print_table
from ._inputs import collect_images, read_texts

if TYPE_CHECKING:
    from .._client import Client

# CLI flag -> IndexParams field.
PARAM_FLAGS = {
    "hnsw_m": "hnsw_m",
    "ef_construction": "hnsw_ef_construction",
    "ef_search": "hnsw_ef_search",
    "nlist": "ivf_nlist",
    "nprobe": "ivf_nprobe",
    "pq_m": "pq_m",
    "pq_nbits": "pq_nbits",
    "train_min": "train_min_vectors",
}


def _print_info(info: CollectionInfo) -> None:
    m = info.model
    params = ", ".join(f"{k}={v}" for k, v in info.params.items() if v) or "-"
    created = datetime.fromtimestamp(info.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    size = human_bytes(info.index_bytes)
    print(f"{info.name}: {info.size} vectors of {info.dimension} dims, {size}")
    print(f"  model        {m.name}@{m.version}  fingerprint {m.fingerprint}")
    print(f"  layer        {info.layer}  pooling {info.pooling}  metric {info.metric}")
    trained = "" if info.trained else "  (untrained: exact search until train_min_vectors)"
    print(f"  index        {info.kind}  {params}{trained}")
    print(f"  created      {created}  log sequence {info.log_sequence}")


def cmd_create(args: argparse.Namespace, client: Client) -> int:

    params = {field: getattr(args, flag) for flag, field in PARAM_FLAGS.items()}
    info = client.create_collection(
        args.name,
        args.model,
        layer=args.layer or "",
        pooling=args.pool,
        metric=args.metric,
        kind=args.kind,
        **{k: v for k, v in params.items() if v},
    )
    if args.json:
        print_json(info.as_dict())
    else:
        _print_info(info)
    return 0


def _ids_for(files: Sequence[Path], mode: str) -> list[str]:
    ids = [f.stem if mode == "stem" else str(f) for f in files]
    first: dict[str, Path] = {}
    for value, f in zip(ids, files, strict=True):
        if value in first:
            raise ValueError(
                f"{first[value]} and {f} would both get id {value!r}; use --ids-from path"
            )
        first[value] = f
    return ids


def text_id(text: str) -> str:
    """A text's id in a collection: the text itself, or its hash when over the id limit."""
    raw = text.encode("utf-8")
    return text if len(raw) <= 512 else "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def add_texts(args: argparse.Namespace, client: Client, texts: list[str]) -> int:
    ids = list(dict.fromkeys(text_id(t) for t in texts))  # a repeated text is stored once
    texts = list(dict.fromkeys(texts))
    inserted = replaced = sequence = 0
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        result = client.upsert(
            args.name, ids[start : start + len(batch)], texts=batch, cache=args.cache
        )
        inserted, replaced = inserted + result.inserted, replaced + result.replaced
        sequence = result.log_sequence
    print(
        f"{args.name}: {inserted} added, {replaced} replaced (log sequence {sequence})",
        file=sys.stderr,
    )
    return 0


def cmd_add(args: argparse.Namespace, client: Client) -> int:
    texts = read_texts(args)
    if texts:
        if args.inputs:
            print("give image files or --text/--text-file, not both", file=sys.stderr)
            return 2
        return add_texts(args, client, texts)
    files = collect_images(args.inputs)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    ids = _ids_for(files, args.ids_from)
    progress = Progress(len(files), f"index add {args.name}", enabled=not args.quiet)
    inserted = replaced = 0
    sequence = 0
    for start in range(0, len(files), args.batch_size):
        batch = files[start : start + args.batch_size]
        result = client.upsert(
            args.name,
            ids[start : start + len(batch)],
            images=[f.read_bytes() for f in batch],
            cache=args.cache,
        )
        inserted += result.inserted
        replaced += result.replaced
        sequence = result.log_sequence
        progress.advance(len(batch))
    print(
        f"{args.name}: {inserted} added, {replaced} replaced (log sequence {sequence})",
        file=sys.stderr,
    )
    return 0


def cmd_search(args: argparse.Namespace, client: Client) -> int:

    if (args.query is None) == (args.text is None):
        print("give one query: an image file, an id (--by-id) or --text", file=sys.stderr)
        return 2
    if args.text is not None:
        results = client.search(
            args.name, texts=[args.text], k=args.k, ef_search=args.ef_search, nprobe=args.nprobe
        )
    elif args.by_id:
        results = client.search(
            args.name, ids=[args.query], k=args.k, ef_search=args.ef_search, nprobe=args.nprobe
        )
    else:
        results = client.search(
            args.name,
            images=[Path(args.query).read_bytes()],
            k=args.k,
            ef_search=args.ef_search,
            nprobe=args.nprobe,
        )
    hits = results[0]
    m = results.model
    if args.json:
        print_json(
            {
                "collection": args.name,
                "query": args.query if args.text is None else args.text,
                "model": {"name": m.name, "version": m.version, "fingerprint": m.fingerprint},
                "hits": [{"id": h.id, "score": h.score} for h in hits],
            }
        )
        return 0
    print_table([(i + 1, f"{h.score:.4f}", h.id) for i, h in enumerate(hits)], ("#", "SCORE", "ID"))
    print(f"{len(hits)} hits from {m.name}@{m.version} ({m.fingerprint[:16]})", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace, client: Client) -> int:

    infos = client.list_collections()
    if args.json:
        print_json([i.as_dict() for i in infos])
        return 0
    rows = [
        (
            i.name,
            i.size,
            f"{i.model.name}@{i.model.version}",
            i.layer,
            i.metric,
            i.kind + ("" if i.trained else " (untrained)"),
            human_bytes(i.index_bytes),
            i.model.fingerprint[:16],
        )
        for i in infos
    ]
    print_table(rows, ("NAME", "SIZE", "MODEL", "LAYER", "METRIC", "KIND", "BYTES", "FINGERPRINT"))
    return 0


def cmd_describe(args: argparse.Namespace, client: Client) -> int:
    info = client.describe_collection(args.name)
    if args.json:
        print_json(info.as_dict())
    else:
        _print_info(info)
    return 0


def cmd_remove(args: argparse.Namespace, client: Client) -> int:
    result = client.remove(args.name, args.ids)
    print(
        f"{args.name}: {result.removed} removed, {result.missing} not found "
        f"(log sequence {result.log_sequence})",
        file=sys.stderr,
    )
    return 0


def cmd_drop(args: argparse.Namespace, client: Client) -> int:
    client.delete_collection(args.name)
    print(f"{args.name}: dropped", file=sys.stderr)
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `embedwarden index ...`."""
    index = sub.add_parser("index", help="similarity search collections (FAISS)")
    cmds = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("create", help="create a collection bound to one model version")
    p.add_argument("name")
    p.add_argument("--model", required=True, help="NAME or NAME@VERSION")
    p.add_argument("--layer", default="", help="layer (default: the model's default layer)")
    p.add_argument("--pool", default="default", help="pooling: default, avg, max, cls, ...")
    p.add_argument("--metric", default="cosine", choices=sorted(METRICS))
    kinds = sorted({*KINDS, "ivf-flat", "ivf-pq"} - {"ivf_flat", "ivf_pq"})
    p.add_argument("--kind", default="flat", choices=kinds, help="ivf = ivf-flat")
    p.add_argument("--hnsw-m", type=_positive, help="HNSW: links per node (default 32)")
    p.add_argument("--ef-construction", type=_positive, help="HNSW: build beam (default 80)")
    p.add_argument("--ef-search", type=_positive, help="HNSW: search beam (default 64)")
    p.add_argument("--nlist", type=_positive, help="IVF: inverted lists (default 256)")
    p.add_argument("--nprobe", type=_positive, help="IVF: lists searched (default nlist/16)")
    p.add_argument("--pq-m", type=_positive, help="IVF-PQ: sub-quantizers (default ~dim/4)")
    p.add_argument("--pq-nbits", type=_positive, help="IVF-PQ: bits per code (default 8)")
    p.add_argument("--train-min", type=_positive, help="IVF: vectors before training")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_create)

    p = cmds.add_parser("add", help="embed image files (or texts) into a collection (server-side)")
    p.add_argument("name")
    p.add_argument("inputs", nargs="*", help="image files or folders (walked recursively)")
    p.add_argument("--text", action="append", help="a text (text models; id: the text itself)")
    p.add_argument("--text-file", action="append", help="UTF-8 file of texts, one per line")
    p.add_argument(
        "--ids-from",
        choices=("path", "stem"),
        default="path",
        help="id of each image: its path as found (default) or its file name without suffix",
    )
    p.add_argument("--batch-size", type=_positive, default=32, help="images per request")
    p.add_argument("--cache", default="on", choices=("on", "off", "refresh"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_add)

    p = cmds.add_parser("search", help="nearest stored images to a query image")
    p.add_argument("name")
    p.add_argument("query", nargs="?", help="an image file (or, with --by-id, a stored id)")
    p.add_argument("--text", help="a text query (collections of text models)")
    p.add_argument("-k", type=_positive, default=10, help="hits to return (default 10)")
    p.add_argument("--by-id", action="store_true", help="QUERY is an id already stored")
    p.add_argument("--ef-search", type=_positive, default=0, help="HNSW override")
    p.add_argument("--nprobe", type=_positive, default=0, help="IVF override")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_search)

    p = cmds.add_parser("list", help="list collections")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_list)

    p = cmds.add_parser("describe", help="show one collection")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_describe)

    p = cmds.add_parser("remove", help="remove ids from a collection")
    p.add_argument("name")
    p.add_argument("ids", nargs="+")
    p.set_defaults(handler=cmd_remove)

    p = cmds.add_parser("drop", help="delete a collection and its files")
    p.add_argument("name")
    p.set_defaults(handler=cmd_drop)
