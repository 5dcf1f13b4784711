"""`nirvana sweep`: one DVC experiment per (method, sparsity), each run through fine-tuning, `compare` and
`measure_gguf`."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from nirvana.core.params import BUILTIN_CORPUS, METHODS

if TYPE_CHECKING:
    from dvc.repo import Repo

DATA_KEYS = ("calibration.path", "finetune.path")  # the params that name a user's file

# `compare` and all it needs: the pruned and the recovered model evaluated, speed timed, and plots/models.csv
# written by the experiment itself (stopping at evaluate@pruned left the committed run's bars in `dvc plots
# diff`); and `measure_gguf`, so that each row carries its llama.cpp speedups. The dense model's GGUF and its
# perplexity (export_gguf@dense, gguf_perplexity@dense) depend on nothing a sweep changes: measured once.
TARGETS = ["compare", "measure_gguf"]


def sweep_commands(methods: list[str], sparsities: list[float], settings: list[str], queue: bool) -> list[list[str]]:
    """The `dvc exp run` command lines, checked before any of them runs."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise ValueError(f"sparsity {bad[0]} is invalid; expected 0 <= sparsity < 1")
    malformed = [s for s in settings if "=" not in s]
    if malformed:
        raise ValueError(f"--set {malformed[0]!r} is not KEY=VALUE")
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


def dvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` with this interpreter's DVC, output captured (sweep and report both call it)."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=env)


def dvc_error(done: subprocess.CompletedProcess[str]) -> str:
    """The line of a failed `dvc` call's output that says why: its first ERROR line, else its first line."""
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("ERROR")), lines[0] if lines else "no message")


def default_remote() -> str:
    """The DVC default remote a shared sweep pulls from and pushes to, or a ValueError saying how to add one."""
    found = dvc("remote", "default")
    if found.returncode != 0 or not found.stdout.strip():
        raise ValueError("--share needs a default DVC remote: `dvc remote add -d NAME URL` (README: Sharing)")
    return found.stdout.strip()


def run_outputs(runs: Path) -> set[str]:
    """The md5 of every output DVC's run records under `runs` name, git-tracked metrics (`cache: false`) included."""
    found = set()
    for record in runs.glob("*/*/*"):
        found |= {out["md5"] for out in (yaml.safe_load(record.read_text()) or {}).get("outs", []) if "md5" in out}
    return found


def transfer_run_outputs(direction: str, remote: str) -> None:
    """Send or fetch the files the run records name: `dvc push --run-cache` sends the records and the cached
    outputs of the workspace, not the git-tracked metrics a stage also wrote, nor the outputs of a run the
    workspace has since left (an experiment before `dvc checkout` of main); without them another machine
    cannot restore the stage and runs it again (found by tests/test_remote.py)."""
    from dvc.data_cloud import get_index
    from dvc.repo import Repo

    with Repo() as repo:
        md5s = run_outputs(Path(repo.stage_cache.cache_dir))
        folders = {md5 for md5 in md5s if md5.endswith(".dir")}  # a folder output's `.dir` list of its files
        if direction == "pull":
            move(repo, "pull", md5s, remote)
            move(repo, "pull", folder_files(repo, folders), remote)  # the lists are here now
            return
        # DVC takes a folder's list on the remote to mean that its files are there too: they go first, checked
        # one by one on the remote, since an earlier push may have recorded a folder whose files never arrived
        get_index(repo.cloud.get_remote_odb(remote, "push")).clear()
        move(repo, "push", (md5s - folders) | folder_files(repo, folders), remote)
        move(repo, "push", folders, remote)


def move(repo: Repo, direction: str, md5s: set[str], remote: str) -> None:
    """`dvc push` or `dvc pull` of these objects of the cache."""
    from dvc_data.hashfile.hash_info import HashInfo

    transfer = repo.cloud.push if direction == "push" else repo.cloud.pull
    transfer({HashInfo("md5", md5) for md5 in md5s}, remote=remote)


def folder_files(repo: Repo, folders: set[str]) -> set[str]:
    """The md5 of every file the `.dir` lists in the local cache name."""
    files = set()
    for md5 in folders:
        listing = Path(repo.cache.local.oid_to_path(md5))
        if listing.is_file():
            files |= {entry["md5"] for entry in json.loads(listing.read_text())}
    return files


def share(direction: str, remote: str) -> None:
    """`dvc push` or `dvc pull` with the run-cache, and the files its records name: outputs and DVC's records of
    which command, deps and params made them, so that a stage another machine already ran is restored instead."""
    missing = ["--allow-missing"] if direction == "pull" else []  # a new remote holds nothing yet
    print(f"+ dvc {direction} --run-cache -r {remote}", flush=True)
    done = dvc(direction, "--run-cache", *missing, "-r", remote)
    if done.returncode != 0:
        raise ValueError(f"dvc {direction} with remote {remote!r} failed: {dvc_error(done)}")
    transfer_run_outputs(direction, remote)


def start_queue(jobs: int) -> None:
    """`dvc queue start -j JOBS` with NIRVANA_JOBS=JOBS in its workers' environment, so that each stage takes
    its share of the CPUs (nirvana.core.stage.cpu_share) instead of every job taking all of them."""
    print(f"+ NIRVANA_JOBS={jobs} dvc queue start -j {jobs}", flush=True)
    done = dvc("queue", "start", "-j", str(jobs), env=os.environ | {"NIRVANA_JOBS": str(jobs)})
    if done.returncode != 0:
        raise ValueError(f"dvc queue start -j {jobs} failed (exit code {done.returncode})")
    print("note: `dvc queue status` follows the runs; a worker started earlier keeps its own NIRVANA_JOBS", flush=True)


def run_experiment(command: list[str]) -> None:
    """One `dvc exp run`; its failure is a ValueError naming the experiment's settings (DVC's own messages are
    printed above it), so that `nirvana sweep` stops in one line instead of a CalledProcessError traceback."""
    print("+", " ".join(command[2:]), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        settings = " ".join(value for flag, value in itertools.pairwise(command) if flag == "-S")
        raise ValueError(
            f"experiment {settings} failed (dvc exp run exit code {code}, its messages above); the ones after it "
            "did not run"
        )


def sweep(
    methods: list[str],
    sparsities: list[float],
    settings: list[str],
    queue: bool,
    shared: bool = False,
    jobs: int | None = None,
) -> None:
    """Run (or queue) every experiment, one after another; with `jobs`, queue them and start that many
    workers, each job with its share of the CPUs. `shared`: first exchange outputs and run records with the
    default remote, and push each finished experiment's to it."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs {jobs} is invalid; expected the number of experiments run at once (>= 1)")
    queue = queue or jobs is not None
    commands = sweep_commands(methods, sparsities, settings, queue)  # every check before anything runs
    remote = default_remote() if shared else ""
    for path in untracked_data(settings) if queue else []:
        print(f"note: {path} is not tracked by git or DVC; each queued run gets a copy (--copy-paths)", flush=True)
    if shared:  # a push first: it fails on a remote that cannot be reached, which a pull of nothing would not
        share("push", remote)
        share("pull", remote)
    for command in commands:
        run_experiment(command)
        if shared and not queue:
            share("push", remote)
    if jobs is not None:
        start_queue(jobs)
    if shared and queue:
        print(f"note: after the queue has run, push the results with `dvc push --run-cache -r {remote}`", flush=True)
