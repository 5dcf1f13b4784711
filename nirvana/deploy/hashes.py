"""The hashes a model card records: SHA-256 of every stored tensor and file of a folder, of the code a stage ran,
and of the dvc.lock entries upstream of it. The same content hashes the same at any commit and on any machine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from nirvana.core.io import sha256_file

CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout the running code comes from (nirvana/deploy/..)
LOCK_NOTE = (
    "SHA-256 over dvc.lock's entries of the stages upstream of this one, which DVC wrote during this "
    "run before this stage started: the exact inputs, params and outputs that fed it"
)
UPSTREAM = {  # the stages whose dvc.lock entries pin what a stage's model was made from
    "prune": ("prepare_model", "prepare_data", "select_calibration", "compute_saliency", "allocate_sparsity"),
    "finetune": (
        "prepare_model",
        "prepare_data",
        "select_calibration",
        "compute_saliency",
        "allocate_sparsity",
        "prune",
    ),
}


# --- what the folder stores ----------------------------------------------------------------------


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def file_tensors(path: Path, name: str) -> dict[str, dict[str, Any]]:
    """dtype, shape and SHA-256 of each tensor in one safetensors file, read with safetensors' safe_open."""
    out: dict[str, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            piece = f.get_slice(key)
            sha = tensor_sha256(f.get_tensor(key))
            out[key] = dict(file=name, dtype=piece.get_dtype(), shape=list(piece.get_shape()), sha256=sha)
    return out


def weight_hashes(folder: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """SHA-256 of every safetensors file and every tensor in `folder`, and of the Python files (the
    modeling file `trust_remote_code` runs); and the files that safetensors could not read (name ->
    error), so that `verify` reports a corrupt header instead of crashing."""
    folder = Path(folder)
    files, tensors, unreadable = {}, {}, {}
    for path in sorted(folder.rglob("*.py")):
        files[path.relative_to(folder).as_posix()] = sha256_file(path)
    for path in sorted(folder.rglob("*.safetensors")):
        name = path.relative_to(folder).as_posix()
        files[name] = sha256_file(path)
        try:
            tensors.update(file_tensors(path, name))
        except Exception as err:  # a truncated or corrupt file: safetensors raises its own error types
            unreadable[name] = f"{type(err).__name__}: {err}"
    return {"files": files, "tensors": tensors}, unreadable


# --- where the code and the pipeline state stood -------------------------------------------------


def _code_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts) if path.is_dir() else [path]


def code_state(stage: str, root: Path = CODE_ROOT) -> dict[str, Any]:
    """SHA-256 of the code `stage` ran: the nirvana/ and stages/ files dvc.yaml lists as its deps (a test
    keeps them equal to what the stage imports). The same code hashes the same at any commit."""
    dvc_yaml = root / "dvc.yaml"
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.is_file() else {}
    if stage not in stages:
        return {"sha256": None, "note": f"no stage {stage} in {dvc_yaml} (code not run from a checkout)"}
    deps = [d for d in stages[stage].get("deps", []) if d.startswith(("nirvana", "stages"))]
    files = {p.relative_to(root).as_posix(): sha256_file(p) for d in deps for p in _code_files(root / d)}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": dict(sorted(files.items()))}


def lock_state(path: str | Path = "dvc.lock", stage: str = "prune") -> dict[str, Any]:
    """SHA-256 of the dvc.lock entries of `stage`'s upstream stages (canonical JSON), or why there is
    none. Only upstream entries: they are final when the stage runs, so the hash is reproducible."""
    path = Path(path)
    digest, upstream = lock_hash(path.read_text() if path.is_file() else "", UPSTREAM.get(stage, ()))
    if digest is None:
        return {"sha256": None, "note": f"no dvc.lock entries upstream of {stage} (not run by DVC)"}
    return {"sha256": digest, "stages": upstream, "note": LOCK_NOTE}


def lock_hash(lock_text: str, stages: tuple[str, ...] | list[str]) -> tuple[str | None, list[str]]:
    """SHA-256 of a dvc.lock's entries of `stages` (canonical JSON), and which of them it has."""
    entries = (yaml.safe_load(lock_text) or {}).get("stages", {}) if lock_text else {}
    upstream = {name: entries[name] for name in stages if name in entries}
    if not upstream:
        return None, []
    text = json.dumps(upstream, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), sorted(upstream)
