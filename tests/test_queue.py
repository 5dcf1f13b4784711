"""Queued and temporary experiments run in a copy of the repository that holds only what git and DVC
track: a user's data file left untracked is named as such, and `nirvana sweep --queue` copies it in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_fixture import checkout, sh

from nirvana.core.params import ParamError
from nirvana.core.stage import cpu_share, running_jobs
from nirvana.pipeline.sweep import sweep, sweep_commands, untracked_data

MINE = "data/calibration/mine.parquet"


@pytest.mark.slow  # a dvc experiment: seconds of imports per command
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


def test_each_job_takes_its_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("NIRVANA_JOBS", raising=False)
    assert cpu_share() == cpus
    monkeypatch.setenv("NIRVANA_JOBS", "2")
    assert cpu_share() == max(1, cpus // 2)
    monkeypatch.setenv("NIRVANA_JOBS", str(4 * cpus))
    assert cpu_share() == 1
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("NIRVANA_JOBS", bad)
        with pytest.raises(ParamError, match="NIRVANA_JOBS"):
            cpu_share()


@pytest.mark.slow  # three stage processes, each importing torch
def test_a_stage_runs_on_its_share_and_refuses_a_bad_job_count(tmp_path: Path) -> None:
    """With cpu.threads null a stage takes its share of the CPUs; with the default fixed count it keeps it
    (the numbers depend on it) and warns that the jobs ask for more threads than there are CPUs."""
    script = Path(__file__).parents[1] / "stages/check_params.py"
    stage = [
        sys.executable,
        str(script),
        *(str(tmp_path / f) for f in ("keys.json", "schema.json", "environment.json")),
    ]
    committed = yaml.safe_load((script.parents[1] / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed | {"cpu": {"kernels": "portable", "threads": None}}))
    done = subprocess.run(stage, cwd=tmp_path, env=os.environ | {"NIRVANA_JOBS": "64"}, capture_output=True, text=True)
    assert done.returncode == 0 and "starting (1 threads" in done.stdout + done.stderr
    assert json.loads((tmp_path / "environment.json").read_text())["cpu"]["threads"] == 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed | {"cpu": {"kernels": "portable", "threads": 2}}))
    done = subprocess.run(stage, cwd=tmp_path, env=os.environ | {"NIRVANA_JOBS": "64"}, capture_output=True, text=True)
    assert done.returncode == 0 and "starting (2 threads" in done.stderr and "64 jobs share" in done.stderr
    done = subprocess.run(stage, cwd=tmp_path, env=os.environ | {"NIRVANA_JOBS": "x"}, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("[check_params] NIRVANA_JOBS = 'x'")


def test_sweep_with_jobs_queues_and_starts_workers_with_their_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = checkout(tmp_path, {})
    monkeypatch.chdir(repo)
    calls = []
    monkeypatch.setattr(
        "nirvana.pipeline.sweep.subprocess.run",
        lambda cmd, **kwargs: calls.append((cmd, kwargs.get("env"))) or subprocess.CompletedProcess(cmd, 0),
    )
    sweep(["nirvana"], [0.3, 0.4], [], queue=False, jobs=2)
    assert [cmd[3:6] for cmd, _ in calls[:2]] == [["exp", "run", "--queue"]] * 2
    (start, env), *rest = calls[2:]
    assert start[3:] == ["queue", "start", "-j", "2"] and env["NIRVANA_JOBS"] == "2" and rest == []
    with pytest.raises(ValueError, match="--jobs 0"):
        sweep(["nirvana"], [0.3], [], queue=False, jobs=0)


def test_a_stage_in_a_queued_copy_shares_the_cpus_with_the_other_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc queue start -j 2` without NIRVANA_JOBS: two temporary copies under .dvc/tmp/exps, half each."""
    monkeypatch.delenv("NIRVANA_JOBS", raising=False)
    exps = tmp_path / ".dvc/tmp/exps"
    for name in ("tmpa1", "tmpb2", "run", "celery"):  # DVC's own folders there are no experiments
        (exps / name).mkdir(parents=True)
    monkeypatch.chdir(exps / "tmpa1")
    assert running_jobs() == 2 and cpu_share() == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.setenv("NIRVANA_JOBS", "1")  # the variable wins
    assert running_jobs() == 1
    monkeypatch.delenv("NIRVANA_JOBS")
    monkeypatch.chdir(tmp_path)  # a workspace run
    assert running_jobs() == 1


def test_a_failed_experiment_stops_the_sweep_in_one_line_naming_its_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nirvana.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    run = subprocess.run
    codes = iter([0, 3])  # the first experiment passes, the second fails as `dvc exp run` does

    def dvc_exp_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return run([sys.executable, "-c", f"raise SystemExit({next(codes)})"], **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("nirvana.pipeline.sweep.subprocess.run", dvc_exp_run)
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--methods", "flap", "--sparsities", "0.1", "0.2", "0.3", "--set", "evaluate.limit=5"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "nirvana sweep: experiment method=flap sparsity=0.2 evaluate.limit=5 failed (dvc exp run exit code 3"
    ), err
