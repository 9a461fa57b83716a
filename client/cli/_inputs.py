"""Which inputs a command reads: named files as given, folders walked for images, sorted; texts
from `--text` and `--text-file`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

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


def read_texts(args: argparse.Namespace) -> list[str]:
    """`--text` values, then the lines of each `--text-file` (UTF-8; blank lines skipped)."""
    texts = list(args.text or [])
    for name in args.text_file or []:
        lines = Path(name).read_text(encoding="utf-8").splitlines()
        texts.extend(line for line in lines if line.strip())
    return texts
