"""The floor plan, enforced: packages by concern, imports one way, no private imports across the
client/server line. A new module that breaks the layering fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = "embedwarden.server"
# A package may import the packages of lower rank (and the foundation modules), never higher.
RANKS = {"models": 0, "backbones": 1, "cache": 1, "serving": 2, "index": 3, "consistency": 3}
RANKS["verify"] = 4
RANKS["rpc"] = 5
FOUNDATION = {
    "_errors",
    "_metrics",
    "_settings",
    "_frameworks",
    "_storage",
}  # import no package above them
MAX_TOP_LEVEL_FILES = 10


def module_name(path: Path) -> str:
    """The import name of a file under server/, client/ or bench/."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    prefix = {
        "server": [SERVER],
        "client": ["embedwarden.client"],
        "bulk": ["embedwarden.ray"],
        "bench": ["bench"],
    }
    parts = prefix[parts[0]] + parts[1:]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Absolute names of every module that `path` imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package[: len(package) - node.level + 1]
                base = ".".join([*head, base] if base else head)
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
    return found


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def is_private(name: str, package: str) -> bool:
    rest = name.removeprefix(package + ".").split(".") if name.startswith(package + ".") else []
    return any(part.startswith("_") and not part.startswith("__") for part in rest)


def test_server_top_level_holds_only_the_wiring_and_foundation():
    top = sorted(p.name for p in (ROOT / "server").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_FILES, top
    packages = {p.name for p in (ROOT / "server").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(RANKS), "a new package needs its place in RANKS"


def test_server_packages_import_only_downwards():
    wrong = set()
    for path in files("server"):
        name = module_name(path).removeprefix(SERVER + ".").split(".")
        here = name[0] if name[0] in RANKS else None
        for target in imports(path):
            if not target.startswith(SERVER + "."):
                continue
            there = target.removeprefix(SERVER + ".").split(".")[0]
            if there not in RANKS:
                continue
            if name[0] in FOUNDATION or (here is not None and RANKS[there] > RANKS[here]):
                wrong.add(f"{path.relative_to(ROOT)} imports {there}/")
            elif here is not None and there != here and RANKS[there] == RANKS[here]:
                wrong.add(f"{path.relative_to(ROOT)} imports {there}/ (same floor)")
    assert not wrong, sorted(wrong)


def test_no_private_imports_across_the_client_server_line():
    wrong = [
        f"{path.relative_to(ROOT)} imports {target}"
        for folder in ("client", "bulk", "bench")
        for path in files(folder)
        for target in imports(path)
        if is_private(target, SERVER)
    ]
    wrong += [
        f"{path.relative_to(ROOT)} imports {target}"
        for path in files("server")
        for target in imports(path)
        if is_private(target, "embedwarden.client")
    ]
    assert not wrong, wrong
