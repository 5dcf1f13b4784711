"""Git+DVC checkouts of the pipeline for the end-to-end tests, and the tiny run they share.

The tiny pipeline (a random 2-layer Llama, tests/conftest.py's `tiny_bpe_model_dir`) is reproduced once per pytest
session (conftest's `tiny_run`); a test that changes a run works on a `copy_run` of it, cache included, instead
of reproducing the pipeline again: each reproduction costs minutes on a 2-core machine."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from nirvana.core.environment import PORTABLE

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "calibration": {
        "num_samples": 4,
        "seq_len": 64,
        "seed": 0,
        "candidates": 2,
        "kl_samples": 8,
        "kl_seq_len": 32,
        "kl_batch_size": 8,
        "select_at_sparsity": 0.2,
    },
    "finetune": {"steps": 4, "seq_len": 32, "batch_size": 2, "save_steps": 2},
    "evaluate": {"windows": [64], "max_tokens": 512, "batch_size": 8, "tasks": ["piqa"], "limit": 8},
    "efficiency": {"batch_sizes": [1], "prompt_len": 16, "new_tokens": 4, "warmup": 0, "repeats": 1},
    "export": {
        "types": ["f16"],
        "ppl_tokens": 256,  # the first 4 of evaluate's 8 wiki windows
        "prompt_len": 16,
        "new_tokens": 4,
        "warmup": 0,
        "repeats": 2,
        "max_repeats": 3,
    },
    "allocation": {"mlp_multiple": 8},  # the tiny checkouts that share these sizes have 40 MLP channels
}
"""Small sizes for the embedded SmolLM2 (tests/test_pipeline.py)."""

# Small sizes on a tiny model: each stage costs little more than its imports.
TINY = {
    **SMALL,
    "calibration": SMALL["calibration"] | {"candidates": 2},
    "finetune": SMALL["finetune"] | {"steps": 4, "save_steps": 2},
    "evaluate": SMALL["evaluate"] | {"tasks": ["piqa"], "limit": 4},
}


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment `sh` runs commands in (this venv's dvc and python first on PATH)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def sh(repo: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=repo, env=dvc_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def stages_run(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def checkout(repo: Path, overrides: dict) -> Path:
    """A fresh git+DVC checkout of the pipeline in `repo`, params.yaml updated by `overrides`."""
    for name in (
        "dvc.yaml",
        "requirements.lock",
        ".dvcignore",
        "stages",
        "nirvana",
        ".dvc/config",
        "data/calibration",
        "data/finetune",
        "data/tasks",
    ):
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, values in overrides.items():
        params[key] = params[key] | values if isinstance(values, dict) else values
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.name", "nirvana tests")  # dvc exp run commits too
    sh(repo, "git", "config", "user.email", "tests@nirvana.invalid")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    return repo


def tiny_checkout(repo: Path, model_dir: Path, overrides: dict | None = None) -> Path:
    """A git+DVC checkout of the pipeline in `repo` on the tiny model saved in `model_dir`."""
    return checkout(repo, TINY | {"model": {"name_or_path": str(model_dir)}} | (overrides or {}))


def reproduce_tiny(repo: Path, model_dir: Path) -> Path:
    """The tiny pipeline reproduced by `dvc repro` with the parent asking for ATen's plainest kernels (the pin,
    cpu.kernels: portable, must win: tests/test_determinism.py), and committed as a user's last run."""
    tiny_checkout(repo, model_dir)
    parent = {k: v for k, v in dvc_env().items() if k not in PORTABLE} | {"ATEN_CPU_CAPABILITY": "default"}
    log = subprocess.run(["dvc", "repro"], cwd=repo, env=parent, capture_output=True, text=True)
    assert log.returncode == 0, f"dvc repro failed:\n{(log.stdout + log.stderr)[-5000:]}"
    assert "compare" in stages_run(log.stdout)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "run")
    return repo


def copy_run(run: Path, repo: Path) -> Path:
    """A copy of a finished checkout in `repo`: its git history, workspace and DVC cache (run-cache included),
    every file its own, so a test may change it; DVC's scratch folder (.dvc/tmp) stays behind."""
    dvc = run / ".dvc"
    shutil.copytree(run, repo, symlinks=True, ignore=lambda folder, _: ["tmp"] if Path(folder) == dvc else [])
    return repo


MODELS = ("dense", "pruned", "finetuned")
"""The models every run evaluates, exports to GGUF and times."""

EXPERIMENT_SPARSITY = 0.4
"""`run_experiment` runs `dvc exp run -S sparsity=0.4`."""


class Experiment(NamedTuple):
    """A copy of the tiny run changed by an experiment (`run_experiment`), and what DVC printed on the way."""

    repo: Path  # the experiment's results in its workspace, the run as committed in git
    repro_log: str  # `dvc repro` of the committed run first: nothing to do
    log: str  # `dvc exp run -S sparsity=0.4`

    @classmethod
    def read(cls, repo: Path) -> Experiment:
        return cls(repo, **json.loads(logs_beside(repo).read_text()))


def logs_beside(repo: Path) -> Path:
    return repo.with_name(f"{repo.name}.logs.json")


def run_experiment(run: Path, repo: Path) -> None:
    """A copy of `run` in `repo`, reproduced again (nothing to do), then changed by `dvc exp run -S
    sparsity=EXPERIMENT_SPARSITY`; both logs go to a file beside it (`Experiment.read`)."""
    copy_run(run, repo)
    again = sh(repo, "dvc", "repro")
    logs = {"repro_log": again, "log": sh(repo, "dvc", "exp", "run", "-S", f"sparsity={EXPERIMENT_SPARSITY}")}
    logs_beside(repo).write_text(json.dumps(logs))


def read_lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def lock_outs(lock: dict) -> dict[tuple[str, str], str]:
    """(stage, output path) -> md5 recorded in dvc.lock, for every output (metrics included)."""
    return {(stage, out["path"]): out["md5"] for stage, entry in lock.items() for out in entry.get("outs", [])}


def file_digests(path: Path) -> dict[str, str]:
    """md5 of every file under `path` (or of `path` itself), by path relative to it."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {f.relative_to(path).as_posix(): hashlib.md5(f.read_bytes()).hexdigest() for f in files}
