"""Does dvc.lock still describe the tree? The committed metrics and README numbers are only as good as
the lock that vouches for them, so `make test` fails when code, data or params moved on without a run.

Only paths that git tracks are checked: pipeline outputs (outputs/, the model folders) do not exist in
a fresh clone, and their hashes are vouched for by the stages that make them. DVC computes every hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

FIX = "run `make run`, then commit dvc.lock, metrics/ and plots/"
SHOWN = 8  # problems listed per stage; the rest are counted


def tracked_files(root: Path) -> set[str]:
    """Paths (relative to `root`) of the files git tracks."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True, check=True)
    return {p for p in listed.stdout.split("\0") if p}


def is_tracked(path: str, tracked: set[str]) -> bool:
    """A file git tracks, or a folder holding at least one."""
    prefix = path.rstrip("/") + "/"
    return path in tracked or any(t.startswith(prefix) for t in tracked)


def lock_stages(root: Path) -> set[str]:
    """Names of the stages dvc.lock has an entry for (foreach items as `stage@key`)."""
    lock = root / "dvc.lock"
    return set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else set()


def _changes(status: dict) -> list[str]:
    """DVC's status dict of one dependency or output as `path (what)` lines; params as `params.yaml: key`."""
    lines = []
    for path, change in status.items():
        if isinstance(change, dict):  # params: {"params.yaml": {"sparsity": "modified"}}
            lines += [f"{path}: {key} {what}" for key, what in change.items()]
        else:
            lines.append(f"{path} {change}")
    return lines


def stale_stages(root: str | Path = ".") -> dict[str, list[str]]:
    """Per stage, what in the tree differs from dvc.lock: tracked deps and outs (hashed by DVC), params
    and the command; empty when the lock describes the tree."""
    from dvc.repo import Repo  # heavy; only this check needs it

    root = Path(root).resolve()
    tracked, locked = tracked_files(root), lock_stages(root)
    stale: dict[str, list[str]] = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            name = stage.name
            if name not in locked:
                stale[name] = ["no entry in dvc.lock"]
                continue
            problems = ["cmd differs from dvc.lock"] if stage.changed_stage() else []
            for item in [*stage.deps, *stage.outs]:
                if type(item).__name__ == "ParamsDependency" or is_tracked(item.def_path, tracked):
                    problems += _changes(item.status())
            if problems:
                stale[name] = problems
    return stale


def lock_report(stale: dict[str, list[str]]) -> str:
    """One block per stale stage, then what to do."""
    lines = [f"dvc.lock does not describe this tree ({len(stale)} stage(s)):"]
    for name, problems in sorted(stale.items()):
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        lines.append(f"  {name}: " + "; ".join(problems[:SHOWN]) + more)
    return "\n".join([*lines, f"To fix: {FIX}."])


if __name__ == "__main__":
    found = stale_stages()
    if found:
        raise SystemExit(lock_report(found))
    print("dvc.lock describes this tree")
