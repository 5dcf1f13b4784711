"""`nirvana audit`: does the committed run come back on this machine? In order, stopping at the first failure:

1. the installed packages against requirements.lock: a difference is named before anything runs;
2. every committed output that this clone's DVC cache holds, against its hash: a damaged file is named;
3. the pipeline rerun from nothing in a clone of HEAD (its own empty cache, this environment, every stage
   forced to run);
4. every output of the rerun against dvc.lock: identical; or, where the two environment records show that
   bits cannot be promised (a GPU, native CPU kernels), the same decisions and every number within RTOL.
   timings/ is never compared (wall-clock figures)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RTOL = 1e-4  # relative tolerance for numbers when bits cannot be promised
# Outputs that hold decisions: the same in every environment (their float columns within RTOL).
DECISIONS = ("outputs/calibration.parquet", "outputs/plan.parquet", "plots/widths.csv")
# Files of a model or GGUF folder that hold float weights, or a card recording the environment: they may
# differ when bits cannot be promised; every other file of a folder output must still be identical.
FLOAT_FILES = (".safetensors", ".gguf", "README.md")
DIGEST_KEY = re.compile(r"(digest|sha256)$")


class AuditError(Exception):
    """The audit cannot go on: the message says what differs or failed."""


@dataclass(frozen=True)
class Row:
    stage: str
    path: str
    verdict: str
    ok: bool


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_packages(lock_text: str) -> dict[str, str]:
    """Package -> version from requirements.lock, with torch from its header (the Makefile's TORCH default)."""
    pins = {canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9][\w.-]*)==([^\s\\;]+)", lock_text, re.M)}
    torch = re.search(r"\(torch==([^\s)]+)", lock_text)
    return pins | ({"torch": torch.group(1)} if torch else {})


def package_drift(lock_text: str) -> list[str]:
    """One line per locked package whose installed version differs (torch: its local build tag aside)."""
    drift = []
    for name, locked in sorted(locked_packages(lock_text).items()):
        try:
            found = version(name)
        except PackageNotFoundError:
            drift.append(f"{name}: {locked} locked, not installed")
            continue
        if (found.split("+")[0] if name == "torch" else found) != locked:
            drift.append(f"{name}: {locked} locked, {found} installed")
    return drift


def lock_outs(lock: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(stage, output path) -> md5 for every output dvc.lock records."""
    stages = lock.get("stages", {})
    return {(stage, o["path"]): o["md5"] for stage, entry in stages.items() for o in entry.get("outs", [])}


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_object(root: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object of a hash in the repository's own cache."""
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def listing(root: Path, md5: str) -> dict[str, str] | None:
    """A folder output's files (relative path -> md5) from its .dir object, or None if the cache lacks it."""
    obj = cache_object(root, md5)
    return {e["relpath"]: e["md5"] for e in json.loads(obj.read_text())} if obj.is_file() else None


def damaged(root: Path, outs: dict[tuple[str, str], str]) -> list[str]:
    """Committed outputs whose cached bytes no longer match their hash (objects the cache lacks are skipped);
    an object several outputs share (the fine-tuned weights in outputs/release) is hashed once."""
    files: list[tuple[str, str]] = []  # (output file, md5 of its object)
    for (_, path), md5 in sorted(outs.items(), key=lambda item: item[0][1]):
        inside = listing(root, md5) if md5.endswith(".dir") else None
        files += [(f"{path}/{rel}", m) for rel, m in inside.items()] if inside else [(path, md5)]
    intact: dict[str, bool] = {}
    for md5 in {m for _, m in files if not m.endswith(".dir") and cache_object(root, m).is_file()}:
        intact[md5] = md5_file(cache_object(root, md5)) == md5
    return [name for name, md5 in files if not intact.get(md5, True)]


def rerun(root: Path, scratch: Path) -> None:
    """Clone HEAD into `scratch` and reproduce the whole pipeline there with this environment's tools; the
    clone's own code is imported (PYTHONPATH), not an editable install's."""
    subprocess.run(["git", "clone", "-q", str(root), str(scratch)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(scratch)}
    log = scratch / ".tmp-audit.log"
    with log.open("w") as handle:
        # --force: a stage whose only outputs are git-tracked metrics (evaluate, measure_gguf) would otherwise be
        # skipped, its committed files taken for the rerun's once its inputs came back identical
        force = ["dvc", "repro", "--force"]
        done = subprocess.run(force, cwd=scratch, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise AuditError(f"`dvc repro` failed in the scratch clone {scratch} (its log: {log}):\n{tail}")


def numbers_close(a: Any, b: Any, where: str = "") -> str | None:
    """The first place where two JSON values differ beyond RTOL (digest keys skipped), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'top level'}: keys differ"
        for key in a:
            found = None if DIGEST_KEY.search(str(key)) else numbers_close(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: lengths differ"
        inner = (numbers_close(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
        return next((f for f in inner if f), None)
    both_numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if both_numbers and math.isclose(a, b, rel_tol=RTOL):
        return None
    return None if a == b else f"{where.lstrip('.')}: {a!r} committed, {b!r} now"


def tables_close(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """Same columns and rows, exact outside float columns, floats within RTOL; else what differs."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return "columns or row count differ"
    for column in a.columns:
        x, y = a[column], b[column]
        if pd.api.types.is_float_dtype(x) and pd.api.types.is_float_dtype(y):
            if not all(math.isclose(p, q, rel_tol=RTOL) or (p != p and q != q) for p, q in zip(x, y, strict=True)):
                return f"column {column} beyond {RTOL:g}"
        elif not x.astype(str).equals(y.astype(str)):
            return f"column {column} differs"
    return None


def read_object(path: str, data: bytes) -> Any:
    """An output file's content: JSON, a table, or None for anything else."""
    if path.endswith(".json"):
        return json.loads(data)
    if path.endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(data))
    if path.endswith(".csv"):
        return pd.read_csv(io.BytesIO(data))
    return None


def committed_bytes(root: Path, path: str, md5: str) -> bytes | None:
    """A committed output file: from git where it is tracked (metrics), else from the DVC cache."""
    shown = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{path}"], capture_output=True)
    if shown.returncode == 0:
        return shown.stdout
    obj = cache_object(root, md5)
    return obj.read_bytes() if obj.is_file() else None


def close_enough(root: Path, scratch: Path, path: str, old: str, new: str) -> tuple[str, bool]:
    """Judge an output that differs in bits when bits cannot be promised."""
    missing = "differs; the committed contents are not in this cache (`dvc pull` first)"
    if old.endswith(".dir"):
        before, after = listing(root, old), listing(scratch, new)
        if before is None or after is None:
            return missing, False
        changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
        strict = [f for f in changed if not f.endswith(FLOAT_FILES)]
        if strict:
            return f"differs in {', '.join(strict[:3])}", False
        return f"float weights differ ({len(changed)} files); judged by the metrics", True
    data = committed_bytes(root, path, old)
    if data is None:
        return missing, False
    a, b = read_object(path, data), read_object(path, (scratch / path).read_bytes())
    if a is None:
        return "differs (not a table or JSON file)", False
    found = tables_close(a, b) if isinstance(a, pd.DataFrame) else numbers_close(a, b)
    if found:
        return f"differs: {found}", False
    return f"within {RTOL:g}" + (" (a decision: the same choices)" if path in DECISIONS else ""), True


def exact_expected(committed: dict[str, Any], fresh: dict[str, Any]) -> bool:
    """Bits are promised when both runs computed in the same recorded environment on the CPU with
    portable kernels."""
    cpu = fresh.get("cpu") or {}
    return committed == fresh and fresh.get("gpu") is None and cpu.get("kernels") == "portable"


def compare(root: Path, scratch: Path, exact: bool) -> list[Row]:
    """One row per output dvc.lock records."""
    old = lock_outs(yaml.safe_load((root / "dvc.lock").read_text()))
    new = lock_outs(yaml.safe_load((scratch / "dvc.lock").read_text()))
    rows = []
    for (stage, path), md5 in sorted(old.items()):
        now = new.get((stage, path))
        if path.startswith("timings/"):
            rows.append(Row(stage, path, "wall-clock timings: not compared", True))
        elif now == md5:
            rows.append(Row(stage, path, "identical", True))
        elif now is None:
            rows.append(Row(stage, path, "not written by the rerun", False))
        elif path == "metrics/environment.json":  # equal whenever bits are promised (exact_expected)
            rows.append(Row(stage, path, "differs: why bits are not promised", True))
        elif exact:
            rows.append(Row(stage, path, "differs", False))
        else:
            rows.append(Row(stage, path, *close_enough(root, scratch, path, md5, now)))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| stage | output | result |", "|---|---|---|"]
    return "\n".join(lines + [f"| {r.stage} | {r.path} | {'' if r.ok else 'FAIL: '}{r.verdict} |" for r in rows])


def audit(root: str | Path = ".", scratch: str | Path | None = None) -> tuple[bool, str]:
    """Run the four checks; (passed, report). The scratch clone is removed unless named or failed."""
    root = Path(root).resolve()
    drift = package_drift((root / "requirements.lock").read_text())
    if drift:
        raise AuditError(
            "installed packages differ from requirements.lock (`make install` installs it):\n  " + "\n  ".join(drift)
        )
    bad = damaged(root, lock_outs(yaml.safe_load((root / "dvc.lock").read_text())))
    if bad:
        raise AuditError("the DVC cache no longer holds what dvc.lock records for:\n  " + "\n  ".join(bad))
    work = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="nirvana-audit-")) / "repo"
    rerun(root, work)
    committed = json.loads(committed_bytes(root, "metrics/environment.json", "") or b"{}")
    fresh = json.loads((work / "metrics/environment.json").read_text())
    exact = exact_expected(committed, fresh)
    rows = compare(root, work, exact)
    passed = all(r.ok for r in rows)
    why = numbers_close(committed, fresh) or "a GPU or native kernels"
    mode = "bits promised (same environment record, CPU, portable kernels)"
    if not exact:
        mode = f"bits not promised ({why}): decisions must match and numbers agree within {RTOL:g}"
    if passed and scratch is None:
        shutil.rmtree(work.parent)
    where = "" if passed and scratch is None else f"\nThe rerun is kept in {work}."
    verdict = "passed" if passed else f"FAILED ({sum(not r.ok for r in rows)} outputs)"
    return passed, f"Audit of {root} at HEAD: {mode}.\n\n{table(rows)}\n\nAudit {verdict}.{where}"
