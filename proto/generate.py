"""Regenerates the Python gRPC and protobuf modules next to the .proto files.

Run `python proto/generate.py` after editing a .proto; `tests/test_packaging.py` fails while the
committed modules differ from what this script produces with the pinned grpcio-tools.

The mypy-protobuf plugins (`protoc-gen-mypy`, `protoc-gen-mypy_grpc`) are passed to protoc by path,
found beside the running interpreter: an environment need not be activated (its bin/ on PATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "embedwarden" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def plugin(name: str) -> str:
    """A protoc plugin's path: beside this interpreter (a venv's bin/), else on PATH."""
    here = (sysconfig.get_path("scripts"), str(Path(sys.executable).parent))
    found = shutil.which(name, path=os.pathsep.join((*here, os.environ.get("PATH", os.defpath))))
    if found is None:
        raise RuntimeError(f"{name} not found beside {sys.executable} or on PATH: mypy-protobuf?")
    return found


def generate(out_root: Path) -> list[Path]:
    """Writes generated modules under out_root/embedwarden/v1 and returns their paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    out_dir = out_root / "embedwarden" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for stale in PACKAGE_DIR.iterdir():
            if stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PACKAGE_DIR / path.name)
            print(f"wrote {PACKAGE_DIR.relative_to(PROTO_ROOT.parent) / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
