"""Atomic stage outputs and logging: an interrupted stage leaves nothing half-written."""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # every stage imports this module; only some write tables
    import pandas as pd

log = logging.getLogger("nirvana")


def setup_logging(stage: str) -> logging.Logger:
    """One log format for every stage: `[stage] message`."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s")
    return log


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _running(pid: int) -> bool:
    """Whether process `pid` exists (off POSIX assumed true: `os.kill` would end it there)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporaries of `path` whose writer no longer runs: a SIGKILL or a crash skips
    `atomic_path`'s cleanup and would otherwise leave a whole model folder behind."""
    prefix = f".tmp-{path.name}-"
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name.removeprefix(prefix)
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            with suppress(FileNotFoundError):  # another writer's cleanup got there first
                _remove(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (`.tmp-<name>-<pid>`); move it into place only if the
    block succeeds. A file replaces a file in one step, so the old one stays whole until then; a
    folder has to be removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() or (path.is_dir() and not path.is_symlink()):
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(data: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed (weight files can be many GB)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_digest(path: str | Path) -> str:
    """SHA-256 over a folder's files (names and bytes), shortened: which model a metric is about."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with file.open("rb") as handle:
            digest.update(file.relative_to(path).as_posix().encode() + hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def code_digest(script: str | Path) -> str:
    """SHA-256 of a stage script and of every nirvana module this process has loaded, shortened: the code the
    stage runs, in its resume keys so that rows or checkpoints written by other code are not resumed."""
    loaded = [(name, getattr(module, "__file__", None)) for name, module in list(sys.modules.items())]
    sources = {name: Path(file) for name, file in loaded if name.partition(".")[0] == "nirvana" and file}
    digest = hashlib.sha256()
    for name, path in sorted({**sources, "__main__": Path(script)}.items()):
        digest.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def asset_folder(package: str, version: str, module: str) -> Path:
    """The folder of an asset package, checked against the pinned version."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package}=={version} is not installed; run `make install`")
    installed = importlib.metadata.version(package)
    if installed != version:
        raise RuntimeError(f"{package} {installed} is installed; the pipeline pins {version}")
    return Path(spec.submodule_search_locations[0])
