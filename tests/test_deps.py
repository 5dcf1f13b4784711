"""dvc.yaml lists, for every stage, exactly the `nirvana` modules its script imports (transitively), so
a change to any code a stage runs reruns it and the lock cannot look fresh over changed code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Deps that are not a stage script's imports but are intended: none today. Add `stage: [path]` with
# a comment saying why, e.g. a module a stage runs through a subprocess rather than an import.
INTENDED_EXTRA: dict[str, list[str]] = {}


def module_file(name: str) -> Path | None:
    """`nirvana.a.b` -> nirvana/a/b.py or nirvana/a/b/__init__.py (None for a name that is not a module)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every nirvana module an import in `path` executes: the module and each parent package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "nirvana":
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i]))}
    return found


def runs_code(path: Path) -> bool:
    """False for a file that is only a docstring (the subpackages' `__init__`): importing it computes nothing,
    so it is no stage's dep; one statement more and it is."""
    body = ast.parse(path.read_text()).body
    return not (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))


def closure(script: Path) -> set[str]:
    """Repository-relative files of every nirvana module `script` imports, directly or not (that run code)."""
    seen: set[str] = set()
    todo = imported_modules(script)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo |= imported_modules(module_file(name)) - seen  # type: ignore[arg-type]
    files = [module_file(n) for n in seen]
    return {str(f.relative_to(ROOT)) for f in files if f is not None and runs_code(f)}


def stage_entries() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (cmd, deps) from dvc.yaml (a foreach stage once, its deps as written)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (s.get("do", s)["cmd"], s.get("do", s).get("deps", [])) for name, s in stages.items()}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_lists_exactly_the_code_it_imports() -> None:
    problems = []
    for name, (cmd, deps) in stage_entries().items():
        scripts = re.findall(r"stages/\w+\.py", cmd)
        assert scripts, f"{name}: no stages/*.py script in its cmd"
        needed = set().union(*(closure(ROOT / s) for s in scripts)) | set(scripts)
        missing = sorted(p for p in needed if not covered(p, deps))
        code_deps = [d for d in deps if d.startswith(("nirvana", "stages"))]
        extra = [d for d in code_deps if not any(covered(p, [d]) for p in needed)]
        extra = sorted(set(extra) - set(INTENDED_EXTRA.get(name, [])))
        if missing:
            problems.append(f"{name}: dvc.yaml omits {', '.join(missing)}")
        if extra:
            problems.append(f"{name}: dvc.yaml lists {', '.join(extra)}, which its script never imports")
    assert not problems, "\n".join(problems)


def test_the_closure_follows_imports_through_packages(tmp_path: Path) -> None:
    """The helper itself: a script importing nirvana.method.surgery pulls in the package __init__ and what
    surgery imports, skips the docstring-only `nirvana/method/__init__.py`, and nothing it never reaches."""
    script = tmp_path / "s.py"
    script.write_text("from nirvana.method.surgery import prune_model\n")
    files = closure(script)
    assert {
        "nirvana/__init__.py",
        "nirvana/method/surgery.py",
        "nirvana/models/remote.py",
        "nirvana/core/io.py",
    } <= files
    assert "nirvana/method/__init__.py" not in files and "nirvana/models/__init__.py" in files
    assert "nirvana/evaluation/zeroshot.py" not in files and "nirvana/pipeline/lockcheck.py" not in files


def test_stages_read_only_paths_named_in_their_cmd() -> None:
    """No stage script reaches a repository path through a constant (every path goes through dvc.yaml)."""
    for script in sorted((ROOT / "stages").glob("*.py")):
        literals = [
            n.value
            for n in ast.walk(ast.parse(script.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        paths = [s for s in literals if re.match(r"^(outputs|metrics|timings|plots|data)/", s)]
        assert not paths, f"{script.name} names {paths} itself; pass them in its dvc.yaml cmd"


def test_no_stage_has_an_uncached_output_outside_its_metrics() -> None:
    """DVC (3.67, `Stage.run`) writes no run-cache record for a stage with a `cache: false` entry among its
    `outs`, so such a stage reruns on every machine that pulls the run-cache; git-tracked files are metrics."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    uncached = [
        f"{name}: {next(iter(out))}"
        for name, stage in stages.items()
        for out in stage.get("do", stage).get("outs", [])
        if isinstance(out, dict) and next(iter(out.values())).get("cache") is False
    ]
    assert not uncached, uncached


def test_every_stage_runs_in_the_locked_environment() -> None:
    """A package change (requirements.lock) reruns every stage, and one of the CPU settings every stage that
    computes with torch; prepare_data only tokenizes and publish copies, check_params reads all of params.yaml,
    check_inputs reads shapes and counts tokens."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert "requirements.lock" in body["deps"], name
        if name not in ("check_params", "check_inputs", "prepare_data", "publish"):
            assert "cpu" in body["params"], name


def test_every_stage_that_a_value_can_fail_comes_after_the_checks() -> None:
    """DVC deletes a stage's outputs before running it: every stage after prepare_model runs after check_inputs,
    which runs every check a value can fail, and every other stage after check_params (issue 36, finding 8)."""
    from dvc.repo import Repo  # heavy; only this test needs it

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        upstream = {stage.name: {s.name for s in nx.descendants(graph, stage)} for stage in graph}
    first = {"check_params": set(), "prepare_model": {"check_params"}, "prepare_data": {"check_params"}}
    first["check_inputs"] = {"check_params", "prepare_model"}
    for name, before in upstream.items():
        checks = first.get(name, {"check_params", "check_inputs"})
        assert checks <= before, f"{name} can run before {', '.join(sorted(checks - before))}"
