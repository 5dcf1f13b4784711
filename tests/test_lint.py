"""`make lint`, which `make test` runs before pytest, fails on a lint, format or type error: each of its three
commands names its own mistake in one copied tree."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ruff and mypy over the whole tree

ROOT = Path(__file__).resolve().parents[1]
# One module per mistake, in the order of the lint recipe's commands: (its text, what that command prints).
MISTAKES = {
    "unused": ("import os\n", "F401"),  # ruff check
    "unformatted": ("x = [1,2 ,3]\n", "would be reformatted"),  # ruff format --check
    "mistyped": ('\ndef f() -> int:\n    return "a"\n', "Incompatible return value type"),  # mypy
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The project's code, and mypy's cache where `make lint` left one: mypy checks the new modules (and
    any whose bytes differ from the cache's) in seconds instead of the whole tree with its imports."""
    for name in ("nirvana", "stages", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    if (ROOT / ".mypy_cache").is_dir():
        shutil.copytree(ROOT / ".mypy_cache", tmp_path / ".mypy_cache")
    return tmp_path


def lint_commands(tree: Path) -> list[str]:
    """The lint recipe's commands as make runs them (`make -n`): make stops at the first that fails, so the
    test runs each one itself."""
    venv = Path(sys.executable).parent.parent
    makefile = ["make", "-n", "--no-print-directory", "-f", str(ROOT / "Makefile"), "lint", f"VENV={venv}"]
    return subprocess.run(makefile, cwd=tree, capture_output=True, text=True, check=True).stdout.splitlines()


def test_each_lint_command_fails_on_its_own_error(tree: Path) -> None:
    for name, (error, _) in MISTAKES.items():
        (tree / "nirvana" / f"{name}.py").write_text('"""A module with one mistake."""\n\n' + error)
    commands = lint_commands(tree)
    assert len(commands) == len(MISTAKES), commands
    for command, (name, (_, printed)) in zip(commands, MISTAKES.items(), strict=True):
        done = subprocess.run(command, shell=True, cwd=tree, capture_output=True, text=True)
        found = done.stdout + done.stderr
        assert done.returncode != 0 and printed in found and f"{name}.py" in found, f"{command}:\n{found}"
