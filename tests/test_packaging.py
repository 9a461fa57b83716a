"""Packaging rules: fresh generated code, a framework-free client, no absolute paths."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_grpc_code_is_fresh(tmp_path):
    # In a subprocess: grpc_tools' protoc and TensorFlow each carry a libprotobuf, and protoc
    # segfaults in a process that has loaded TensorFlow (the Keras tests load it in this one).
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "import generate; print(*('GENERATED ' + str(p) for p in "
        "generate.generate(Path(sys.argv[2]))), sep='\\n')"
    )
    # This interpreter's bin/ off PATH, as in a venv that is not activated: generate.py finds
    # the mypy-protobuf plugins by itself.
    own = {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p not in own)
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "proto"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": path},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    generated = [
        Path(line.removeprefix("GENERATED "))
        for line in result.stdout.splitlines()
        if line.startswith("GENERATED ")
    ]
    assert generated
    stale = []
    for fresh in generated:
        committed = ROOT / "proto" / "embedwarden" / "v1" / fresh.name
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    assert not stale, f"regenerate with `python proto/generate.py`: {stale}"


def test_the_base_install_is_the_client_without_frameworks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "tensorflow", "keras", "faiss", "lmdb", "pillow"):
        assert heavy not in base
    code = (
        "import sys, embedwarden.client, embedwarden.client.cli; "
        "bad = [m for m in ('torch', 'tensorflow', 'PIL', 'faiss') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_absolute_paths_of_a_machine_in_the_repo():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # This checkout, this user's home, and the development machine's layout (built from parts
    # so that this file does not match itself).
    markers = {str(ROOT) + "/", str(Path.home()) + "/", "/".join(("", "work", "main", ""))}
    offenders = []
    for name in tracked:
        path = ROOT / name
        if (
            path.suffix in {".py", ".toml", ".md", ".yml", ".yaml", ".json", ".sh", ""}
            and path.is_file()
        ):
            text = path.read_text(errors="ignore")
            if any(marker in text for marker in markers):
                offenders.append(name)
    assert not offenders, offenders


def test_every_package_folder_is_listed_in_pyproject():
    """A package folder missing from `packages` would be left out of every wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for import_name, folder in tool["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((import_name, *rel.parts)))
    assert found, "no package folders found"
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed <= found, f"listed without a folder: {sorted(listed - found)}"
