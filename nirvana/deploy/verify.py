"""`nirvana verify`: a released folder's weights checked against the hashes its model card records, and the commit
whose dvc.lock made them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from nirvana.deploy.card import CARD, read_card
from nirvana.deploy.hashes import lock_hash, weight_hashes


def _tensor_difference(card: dict[str, Any], found: dict[str, Any]) -> str:
    fields = [k for k in ("sha256", "dtype", "shape", "file") if card.get(k) != found.get(k)]
    shown = [f"{k} {card.get(k)} in the card, {found.get(k)} in the folder" for k in fields if k != "sha256"]
    return ", ".join((["SHA-256 differs"] if "sha256" in fields else []) + shown)


def compare_weights(card: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """One line per file or tensor that is missing, extra or different."""
    problems = []
    for kind in ("files", "tensors"):
        recorded, present = card.get(kind) or {}, found[kind]
        for name in sorted(recorded.keys() | present.keys()):
            where = f"{kind[:-1]} {name}"
            if name not in present:
                problems.append(f"{where}: missing (in the card, not in the folder)")
            elif name not in recorded:
                problems.append(f"{where}: extra (in the folder, not in the card)")
            elif recorded[name] != present[name]:
                diff = "SHA-256 differs" if kind == "files" else _tensor_difference(recorded[name], present[name])
                problems.append(f"{where}: {diff}")
    return problems


def lock_commits(lock: dict[str, Any], repo: str | Path = ".") -> list[str] | None:
    """The commits of `repo` whose committed dvc.lock has the entries a card's `dvc_lock` hash covers, oldest
    first: the commit of the run that made the model (later ones kept those entries). None outside git."""
    if not lock.get("sha256"):
        return []
    git = ["git", "-C", str(repo)]
    history = subprocess.run([*git, "log", "--format=%H", "--", ":/dvc.lock"], capture_output=True, text=True)
    if history.returncode != 0:
        return None
    found = []
    for commit in reversed(history.stdout.split()):
        text = subprocess.run([*git, "show", f"{commit}:dvc.lock"], capture_output=True, text=True).stdout
        if lock_hash(text, lock.get("stages", []))[0] == lock["sha256"]:
            found.append(commit)
    return found


def provenance_line(card: dict[str, Any], repo: str | Path = ".") -> str:
    """Where the card's dvc.lock hash leads in this repository's history, in one line."""
    commits = lock_commits(card.get("dvc_lock") or {}, repo)
    if commits is None:
        return "not in a git repository: clone the project to find the commit that made it"
    if not commits:
        return "no commit here has the dvc.lock entries its card names (an uncommitted run, or another repository)"
    later = f" (and {len(commits) - 1} later commit(s) that kept them)" if len(commits) > 1 else ""
    return f"made by the run committed in {commits[0][:12]}{later}: `git checkout {commits[0][:12]}` to reproduce it"


def verify_folder(folder: str | Path) -> tuple[bool, str]:
    """Recompute the weight hashes of `folder` and check them against its card: (ok, message)."""
    folder = Path(folder)
    try:
        card = (read_card(folder).get("nirvana") or {}).get("weights")
    except (OSError, ValueError, yaml.YAMLError) as err:
        return False, f"{folder}: no readable model card: {err}"
    if not isinstance(card, dict):
        return False, f"{folder / CARD}: no nirvana.weights section to check against"
    found, unreadable = weight_hashes(folder)
    problems = [f"file {name}: unreadable by safetensors ({err})" for name, err in unreadable.items()]
    problems += compare_weights(card, found)
    if problems:
        return False, f"{folder}: {len(problems)} problem(s) against {folder / CARD}:\n  " + "\n  ".join(problems)
    weights = [name for name in found["files"] if name.endswith(".safetensors")]
    others = len(found["files"]) - len(weights)
    also = f" and {others} Python file(s)" if others else ""
    return True, f"{folder}: OK, {len(found['tensors'])} tensors in {len(weights)} safetensors file(s){also} match"
