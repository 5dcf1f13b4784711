"""Imports only go down: each folder of `nirvana/` may import what its `__init__` docstring's "May import:"
line names (and itself), so the docstrings are the picture of the package and cannot drift from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nirvana"
FOLDERS = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def allowed(folder: str) -> set[str] | None:
    """The folders `folder` may import, from its docstring; None for "anything"."""
    doc = ast.get_docstring(ast.parse((ROOT / folder / "__init__.py").read_text())) or ""
    line = re.search(r"^May import: (.+)$", doc, re.MULTILINE)
    assert line, f"nirvana/{folder}/__init__.py: its docstring has no 'May import:' line"
    if line.group(1).startswith("anything"):
        return None
    return {folder} | set(re.findall(r"nirvana\.(\w+)", line.group(1)))


def imported_folders(path: Path) -> set[str]:
    """The nirvana folders an import anywhere in `path` (functions included) reaches."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n.split(".")[1] for n in names if n.startswith("nirvana.") and n.split(".")[1] in FOLDERS}


def test_every_folder_imports_only_what_its_docstring_allows() -> None:
    problems = []
    for folder in FOLDERS:
        permitted = allowed(folder)
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name == "modeling_nirvana.py":  # copied into released folders: imports no nirvana at all
                assert not imported_folders(path) and "import nirvana" not in path.read_text()
                continue
            extra = imported_folders(path) - (permitted if permitted is not None else set(FOLDERS))
            problems += [f"{path.relative_to(ROOT.parent)} imports nirvana.{e}" for e in sorted(extra)]
    assert not problems, "\n".join(problems)


def test_the_layers_form_no_cycle() -> None:
    """The allowed imports are a strict order: no folder may import one that may import it back."""
    graph = {f: (allowed(f) or set(FOLDERS)) - {f} for f in FOLDERS}
    for folder, below in graph.items():
        assert all(folder not in graph[other] for other in below), f"{folder} and one below it import each other"
