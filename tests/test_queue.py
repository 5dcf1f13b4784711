"""Queued and temporary experiments run in a copy of the repository that holds only what git and DVC
track: a user's data file left untracked is named as such, and `nirvana sweep --queue` copies it in."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline import checkout, sh

from nirvana.sweep import sweep_commands, untracked_data

MINE = "data/calibration/mine.parquet"


def test_a_temporary_run_names_the_untracked_file_and_copy_paths_fixes_it(tmp_path: Path) -> None:
    """The trial's step (`dvc exp run --queue -S calibration.path=...` on an untracked file), run with
    --temp, which uses the same executor in a temporary copy, and only the first stage as target."""
    repo = checkout(tmp_path, {})
    pd.DataFrame({"text": ["my own calibration text"]}).to_parquet(repo / MINE)
    run = ["dvc", "exp", "run", "--temp", "check_params", "-S", f"calibration.path={MINE}"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(run, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("[check_params]")]
    assert len(lines) == 1 and f"calibration.path = '{MINE}' is in your workspace but not tracked" in lines[0]
    assert "--copy-paths" in lines[0]
    sh(repo, *run[:3], "--copy-paths", MINE, *run[3:])  # what the message suggests: it passes


def test_sweep_copies_untracked_user_files_into_queued_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = checkout(tmp_path, {})
    monkeypatch.chdir(repo)
    (repo / MINE).write_bytes(b"rows")
    setting = [f"calibration.path={MINE}"]
    assert untracked_data(setting) == [MINE]
    queued = sweep_commands(["nirvana"], [0.3], setting, queue=True)[0]
    assert queued[queued.index("--copy-paths") + 1] == MINE
    assert "--copy-paths" not in sweep_commands(["nirvana"], [0.3], setting, queue=False)[0]
    sh(repo, "git", "add", MINE)
    assert untracked_data(setting) == []  # tracked: the queued copy has it
    assert untracked_data([]) == []  # the built-in pool is an output, not a user file
