"""Results travel between machines through a DVC remote: machine A (a clone) runs the tiny pipeline and pushes;
machine B (another clone of the same git remote, an empty cache) pulls byte-identical outputs that verify, restores
what A's shared sweep recorded instead of running it, and sees A's pushed experiment next to its own. A local-folder
remote, real `dvc` and `git` commands, no mocks."""

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixture import EXPERIMENT_SPARSITY, Experiment, copy_run, file_digests, sh, stages_run

OUTPUTS = ["outputs/base_model", "outputs/pruned_model", "outputs/finetuned_model", "outputs/release", "outputs/gguf"]


@pytest.fixture(scope="module")
def machines(tiny_experiment: Experiment, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: the pipeline run (a copy of the session's tiny experiment, back at the committed run; its run-cache
    holds the experiment), committed and pushed (git to a bare origin, data and run-cache to the remote); B: a
    fresh clone of origin that has pulled nothing yet."""
    root = tmp_path_factory.mktemp("machines")
    a = copy_run(tiny_experiment.repo, root / "a")
    sh(a, "git", "checkout", "--", ".")
    sh(a, "dvc", "checkout")
    sh(a, "dvc", "remote", "add", "-d", "storage", str(root / "storage"))
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
    verified = sh(b, sys.executable, "-m", "nirvana.pipeline.cli", "verify", "outputs/finetuned_model")
    assert "OK" in verified and "made by the run committed in" in verified


RESTORED = (
    "select_calibration",
    "allocate_sparsity",
    "prune",
    "finetune",
    "evaluate@pruned",
    "evaluate@finetuned",
    "compare",
)


@pytest.mark.slow
def test_a_shared_sweep_restores_on_b_what_a_ran_and_a_reports_b_sees(machines: tuple[Path, Path]) -> None:
    """A sweeps sparsity 0.4 with --share (restored from the run-cache of the session's experiment, as on a
    machine that ran it); B, sweeping the same, restores the search, the pruning and the fine-tuning from A's
    records instead of running them, and gets A's model. A pushes its experiment; B pulls
    it, and `nirvana report` lists it beside B's own with A's numbers."""
    a, b = machines
    sweep = [
        sys.executable,
        "-m",
        "nirvana.pipeline.cli",
        "sweep",
        "--methods",
        "nirvana",
        "--sparsities",
        str(EXPERIMENT_SPARSITY),
        "--share",
    ]
    sh(a, *sweep)
    log = sh(b, *sweep)
    for stage in RESTORED:
        assert f"Stage '{stage}' is cached - skipping run" in log, log[-3000:]
    # every stage that computes was restored or unchanged; the checks, whose outputs persist (the run cache
    # skips such stages), check B's params and model again in seconds
    assert stages_run(log) <= {"check_params", "check_inputs"}, log[-3000:]
    assert file_digests(b / "outputs/finetuned_model") == file_digests(a / "outputs/finetuned_model")

    (name,) = sh(a, "dvc", "exp", "list", "--name-only").split()
    sh(a, "dvc", "exp", "push", "origin", name)
    sh(b, "dvc", "exp", "pull", "origin", name)
    report = sh(b, sys.executable, "-m", "nirvana.pipeline.cli", "report")
    rows = [line for line in report.splitlines() if "| nirvana " in line and f"{EXPERIMENT_SPARSITY} (" in line]
    assert len({row.split("|")[1].strip() for row in rows}) == 2, report  # A's experiment and B's
    ppl = json.loads((a / "metrics/pruned.json").read_text())["ppl_wiki_64"]
    assert any(row.split("|")[1].strip() == name and f"{ppl:.4g}" in row for row in rows), report


@pytest.mark.slow
def test_a_shared_sweep_without_a_usable_remote_stops_in_one_line_before_running(
    machines: tuple[Path, Path], tmp_path: Path
) -> None:
    """`nirvana sweep --share` with no default remote, or one that cannot be reached: one line, exit 1, no
    experiment run and nothing in the workspace changed."""
    _, b = machines
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sweep = [
        sys.executable,
        "-m",
        "nirvana.pipeline.cli",
        "sweep",
        "--methods",
        "flap",
        "--sparsities",
        "0.1",
        "--share",
    ]
    before = {out: file_digests(b / out) for out in OUTPUTS if (b / out).exists()}
    experiments = sh(b, "dvc", "exp", "list", "--name-only")

    sh(b, "dvc", "remote", "default", "--unset")
    done = subprocess.run(sweep, cwd=b, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "nirvana sweep: --share needs a default DVC remote: `dvc remote add -d NAME URL` (README: Sharing)"
    ], done.stderr

    (tmp_path / "not-a-folder").write_text("a file where the remote's folder should be\n")
    sh(b, "dvc", "remote", "add", "-d", "-f", "broken", str(tmp_path / "not-a-folder"))
    done = subprocess.run(sweep, cwd=b, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("nirvana sweep: dvc push with remote 'broken' failed: ERROR: "), done.stderr
    assert "+ dvc exp run" not in done.stdout
    assert sh(b, "dvc", "exp", "list", "--name-only") == experiments
    assert {out: file_digests(b / out) for out in before} == before
    sh(b, "dvc", "remote", "default", "storage")


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def ssh_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An sshd of this test's own on a free loopback port, letting this user in with a fresh key: (the remote's
    ssh:// URL, the key file). Skipped where sshd is not installed (.ci/run installs openssh-server)."""
    if not Path(SSHD).is_file():
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {root}/host_key\nAuthorizedKeysFile {root}/authorized_keys\n"
        f"PidFile {root}/sshd.pid\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
        "UsePAM no\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if server.poll() is not None:
                pytest.skip(f"sshd did not start: {server.stderr.read().strip() if server.stderr else ''}")
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}{root}/storage", root / "user_key"
    finally:
        server.terminate()
        server.wait()


@pytest.mark.slow
def test_an_ssh_remote_carries_outputs_and_run_records(
    machines: tuple[Path, Path], ssh_remote: tuple[str, Path], tmp_path: Path
) -> None:
    """The same round trip over SSH (dvc-ssh, SFTP to a real sshd): A pushes the committed run's outputs and run
    records; C, a fresh clone with an empty cache, pulls them, and its outputs are the lock's and verify."""
    a, _ = machines
    url, key = ssh_remote
    c = tmp_path / "c"
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(a.parent / "origin.git"), "c")
    for repo in (a, c):
        sh(repo, "dvc", "remote", "add", "--local", "ssh", url)
        sh(repo, "dvc", "remote", "modify", "--local", "ssh", "keyfile", str(key))
    sh(a, "dvc", "push", "--run-cache", "--all-branches", "-r", "ssh")  # main's run, whatever a sweep left in A
    sh(c, "dvc", "pull", "--run-cache", "-r", "ssh")
    assert "up to date" in sh(c, "dvc", "status")  # every output has the md5 that dvc.lock names
    assert len(list((c / ".dvc/cache/runs").glob("*/*/*"))) == len(list((a / ".dvc/cache/runs").glob("*/*/*")))
    assert "OK" in sh(c, sys.executable, "-m", "nirvana.pipeline.cli", "verify", "outputs/finetuned_model")
