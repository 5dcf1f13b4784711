"""Results travel between machines through a DVC remote: machine A (a clone) runs the tiny pipeline and pushes;
machine B (another clone of the same git remote, an empty cache) pulls byte-identical outputs that verify, and sees
A's pushed experiment next to its own run. A local-folder remote, real `dvc` and `git` commands, no mocks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_determinism import file_digests, tiny_checkout
from test_pipeline import sh

from conftest import tiny_model_dir

OUTPUTS = ["outputs/base_model", "outputs/pruned_model", "outputs/finetuned_model", "outputs/release", "outputs/gguf"]


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: the pipeline run, committed and pushed (git to a bare origin, data and run-cache to the remote);
    B: a fresh clone of origin that has pulled nothing yet."""
    root = tmp_path_factory.mktemp("machines")
    model = tiny_model_dir(root / "tiny_model")
    a = tiny_checkout(root / "a", model)
    sh(a, "dvc", "remote", "add", "-d", "storage", str(root / "storage"))
    sh(a, "dvc", "repro")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "run, with its remote")
    sh(root, "git", "init", "-q", "--bare", "origin.git")
    sh(a, "git", "remote", "add", "origin", str(root / "origin.git"))
    sh(a, "git", "push", "-q", "origin", "HEAD:main")
    sh(a, "dvc", "push", "--run-cache")
    sh(root, "git", "clone", "-q", "-b", "main", str(root / "origin.git"), "b")
    b = root / "b"
    for key, value in (("user.name", "machine b"), ("user.email", "b@nirvana.invalid")):
        sh(b, "git", "config", key, value)
    return a, b


@pytest.mark.slow
def test_a_pull_gives_byte_identical_outputs_that_verify(machines: tuple[Path, Path]) -> None:
    a, b = machines
    assert not (b / ".dvc/cache").exists()  # nothing was computed or fetched on B
    sh(b, "dvc", "pull")
    for out in OUTPUTS:
        assert file_digests(b / out) == file_digests(a / out), out
    assert "up to date" in sh(b, "dvc", "status")
    verified = sh(b, sys.executable, "-m", "nirvana.cli", "verify", "outputs/finetuned_model")
    assert "OK" in verified and "made by the run committed in" in verified


@pytest.mark.slow
def test_an_experiment_pushed_on_one_machine_is_reported_on_the_other(machines: tuple[Path, Path]) -> None:
    """A runs an experiment at another sparsity and pushes it (git refs to origin, data to the remote); B pulls
    it, and `nirvana report` lists it beside B's committed run, with A's numbers."""
    a, b = machines
    sh(a, "dvc", "exp", "run", "-n", "a-sparsity-0.3", "-S", "sparsity=0.3")
    sh(a, "dvc", "exp", "push", "origin", "a-sparsity-0.3")
    sh(b, "dvc", "exp", "pull", "origin", "a-sparsity-0.3")
    report = sh(b, sys.executable, "-m", "nirvana.cli", "report")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in report.splitlines()[2:] if "|" in line}
    assert {("main", "nirvana"), ("a-sparsity-0.3", "nirvana")} <= rows, report
    ppl = json.loads((a / "metrics/pruned.json").read_text())["ppl_wiki_64"]
    assert any(line.startswith("| a-sparsity-0.3") and f"{ppl:.4g}" in line for line in report.splitlines())


@pytest.mark.slow
def test_a_shared_sweep_without_a_usable_remote_stops_in_one_line_before_running(
    machines: tuple[Path, Path], tmp_path: Path
) -> None:
    """`nirvana sweep --share` with no default remote, or one that cannot be reached: one line, exit 1, no
    experiment run and nothing in the workspace changed."""
    _, b = machines
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sweep = [sys.executable, "-m", "nirvana.cli", "sweep", "--methods", "flap", "--sparsities", "0.1", "--share"]
    before = {out: file_digests(b / out) for out in OUTPUTS if (b / out).exists()}
    experiments = sh(b, "dvc", "exp", "list", "--name-only")

    sh(b, "dvc", "remote", "default", "--unset")
    done = subprocess.run(sweep, cwd=b, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "sweep: --share needs a default DVC remote: `dvc remote add -d NAME URL` (README: Sharing)"
    ], done.stderr

    (tmp_path / "not-a-folder").write_text("a file where the remote's folder should be\n")
    sh(b, "dvc", "remote", "add", "-d", "-f", "broken", str(tmp_path / "not-a-folder"))
    done = subprocess.run(sweep, cwd=b, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("sweep: dvc push with remote 'broken' failed: ERROR: "), done.stderr
    assert "+ dvc exp run" not in done.stdout
    assert sh(b, "dvc", "exp", "list", "--name-only") == experiments
    assert {out: file_digests(b / out) for out in before} == before
    sh(b, "dvc", "remote", "default", "storage")
