"""`nirvana sweep`: one DVC experiment per (method, sparsity), each run through fine-tuning and `compare`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from nirvana.params import BUILTIN_CORPUS, METHODS

DATA_KEYS = ("calibration.path", "finetune.path")  # the params that name a user's file

# `compare` and all it needs: the pruned and the recovered model evaluated, speed timed, and plots/models.csv
# written by the experiment itself (stopping at evaluate@pruned left the committed run's bars in `dvc plots
# diff`). The GGUF export and llama.cpp timing stay out; `dvc exp run` with no target adds them.
TARGETS = ["compare"]


def sweep_commands(methods: list[str], sparsities: list[float], settings: list[str], queue: bool) -> list[list[str]]:
    """The `dvc exp run` command lines, checked before any of them runs."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"sweep: unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise ValueError(f"sweep: sparsity {bad[0]} is invalid; expected 0 <= sparsity < 1")
    malformed = [s for s in settings if "=" not in s]
    if malformed:
        raise ValueError(f"sweep: --set {malformed[0]!r} is not KEY=VALUE")
    copies = [arg for path in untracked_data(settings) for arg in ("--copy-paths", path)] if queue else []
    dvc = [sys.executable, "-m", "dvc", "exp", "run", *(["--queue", *copies] if queue else []), *TARGETS]
    extra = [arg for setting in settings for arg in ("-S", setting)]
    return [
        [*dvc, "-S", f"method={method}", "-S", f"sparsity={sparsity}", *extra]
        for method in methods
        for sparsity in sparsities
    ]


def untracked_data(settings: list[str], params_file: str = "params.yaml") -> list[str]:
    """User data files (calibration.path, finetune.path, after --set) that neither git nor DVC tracks:
    a queued run's copy of the repository holds only tracked files, so these must be copied in."""
    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    values = {key: (raw.get(key.split(".")[0]) or {}).get(key.split(".")[1]) for key in DATA_KEYS}
    values |= {k: v for k, _, v in (s.partition("=") for s in settings) if k in DATA_KEYS}
    files = [v for v in values.values() if v and v != BUILTIN_CORPUS and Path(v).is_file()]
    return [f for f in files if not _tracked(f)]


def _tracked(path: str) -> bool:
    """In git's index, or under a `.dvc` file of its own or of a folder above it."""
    listed = subprocess.run(["git", "ls-files", "--error-unmatch", path], capture_output=True).returncode == 0
    return listed or any(Path(f"{p}.dvc").is_file() for p in (Path(path), *Path(path).parents))


def sweep(methods: list[str], sparsities: list[float], settings: list[str], queue: bool) -> None:
    """Run (or queue, for `dvc queue start -j N`) every experiment, one after another."""
    for path in untracked_data(settings) if queue else []:
        print(f"note: {path} is not tracked by git or DVC; each queued run gets a copy (--copy-paths)", flush=True)
    for command in sweep_commands(methods, sparsities, settings, queue):
        print("+", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
