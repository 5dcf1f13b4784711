"""Interrupted stages leave nothing half-written, and the next `dvc repro` finishes the job.

A copy of the session's tiny pipeline run (tests/conftest.py's `tiny_run`) has stages started again and
killed at chosen points. A `sitecustomize` hook, put on the stage processes'
PYTHONPATH, makes each kill land where it is meant to: the stage writes a marker holding its pid
and sleeps (a) inside `os.replace` of a named output, i.e. with the output fully written under
its temporary name, or (b) right after Trainer saved the checkpoint of a given step. Then:
SIGINT to the whole `dvc` process group, or SIGKILL to the stage's python process only.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixture import copy_run, dvc_env, file_digests, lock_outs, read_lock, sh, stages_run

ROOT = Path(__file__).resolve().parents[1]
HOOK = '''
"""Test hook (tests/test_interruption.py): hold a stage process where a kill should land."""
import os
import sys
import time

HOLD, MARK = os.environ.get("NIRVANA_TEST_HOLD", ""), os.environ.get("NIRVANA_TEST_MARK", "")


def hold():
    with open(MARK + ".part", "w") as handle:
        handle.write(str(os.getpid()))
    os.rename(MARK + ".part", MARK)
    for _ in range(6000):  # short sleeps: a SIGINT that lands on another thread (torch's) is still handled
        time.sleep(0.1)


if HOLD and MARK and sys.argv and sys.argv[0].replace(os.sep, "/").startswith("stages/"):
    KIND, _, ARG = HOLD.partition(":")
    if KIND == "replace":  # hold before an output's temporary is renamed into place
        _replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == ARG:
                hold()
            return _replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif KIND == "save":  # hold once Trainer has saved the checkpoint of step ARG
        from transformers.trainer_callback import CallbackHandler

        _on_save = CallbackHandler.on_save

        def on_save(self, args, state, control, **kwargs):
            out = _on_save(self, args, state, control, **kwargs)
            if state.global_step == int(ARG):
                hold()
            return out

        CallbackHandler.on_save = on_save
'''
# the parts of metrics/finetune.json that describe how the run went, not the model it made
# model_digest covers the folder's card, which records resumed_from_step
RUN_RECORD = {"resumed_from_step", "steps_per_process", "train_loss", "model_digest"}
# A model folder's card (nirvana/deploy/card.py) records that run too (resumed_from_step, ...) and the
# SHA-256 dvc.lock had when the stage ran, so a resumed run writes the same weights, config and
# tokenizer but another README.md, and so another folder hash in dvc.lock.
CARD = "README.md"
STASH: dict[str, Path] = {}  # a complete checkpoint that test_finetune_killed... leaves for the cut-short test


class Pipeline:
    """A copy of the tiny pipeline's run, with what that uninterrupted run wrote."""

    def __init__(self, repo: Path, scratch: Path) -> None:
        self.repo, self.scratch = repo, scratch
        self.started: list[subprocess.Popen] = []
        (scratch / "hook").mkdir()
        (scratch / "hook/sitecustomize.py").write_text(textwrap.dedent(HOOK).lstrip())
        self.lock = read_lock(repo)
        self.outs = lock_outs(self.lock)
        self.files = {path: file_digests(repo / path) for _, path in self.outs}
        self.finetune_metrics = json.loads((repo / "metrics/finetune.json").read_text())

    def outs_of(self, stage: str) -> list[str]:
        return [path for name, path in self.outs if name == stage]

    def start_held(self, hold: str, *args: str) -> tuple[subprocess.Popen, int]:
        """Start `dvc repro ARGS` in its own process group with the hook holding at `hold`; return
        the dvc process and the pid of the held stage process once it holds."""
        mark = self.scratch / f"mark-{uuid.uuid4().hex}"
        log = mark.with_suffix(".log")
        env = dvc_env(
            PYTHONPATH=os.pathsep.join(filter(None, [str(self.scratch / "hook"), os.environ.get("PYTHONPATH")])),
            NIRVANA_TEST_HOLD=hold,
            NIRVANA_TEST_MARK=str(mark),
        )
        with log.open("w") as handle:
            proc = subprocess.Popen(
                ["dvc", "repro", *args],
                cwd=self.repo,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        self.log = log  # what dvc and the stage printed
        deadline = time.monotonic() + 600
        while not mark.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                pytest.fail(f"dvc repro {' '.join(args)} never held at {hold}:\n{log.read_text()[-5000:]}")
            time.sleep(0.05)
        return proc, int(mark.read_text())

    def close(self) -> None:
        """Kill whatever a failed test left holding (each dvc run has a process group of its own)."""
        for proc in self.started:
            if proc.poll() is None:  # dvc waits for its stage, so the group is still ours
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def assert_absent_or_unchanged(self, stage: str) -> None:
        """No output of `stage` is half-written: each is missing or equals the uninterrupted run's."""
        for path in self.outs_of(stage):
            if (self.repo / path).exists():
                assert file_digests(self.repo / path) == self.files[path], path

    def assert_unchanged(self, stage: str) -> None:
        for path in self.outs_of(stage):
            assert file_digests(self.repo / path) == self.files[path], path

    def leftovers(self) -> list[Path]:
        """Temporaries (`.tmp-<name>-<pid>`, files or folders) anywhere in the workspace."""
        return [p for p in self.repo.rglob(".tmp-*") if not {".git", ".dvc"} & set(p.relative_to(self.repo).parts)]

    def assert_up_to_date(self) -> None:
        assert "up to date" in sh(self.repo, "dvc", "status", "finetune")


def stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait for a dvc process to end; kill its process group (ours) if it does not."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@pytest.fixture(scope="module")
def pipeline(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    repo = copy_run(tiny_run, tmp_path_factory.mktemp("interrupted") / "repo")
    pipeline = Pipeline(repo, tmp_path_factory.mktemp("hook"))
    yield pipeline
    pipeline.close()


@pytest.mark.slow
def test_select_calibration_killed_mid_write_leaves_no_partial_output(pipeline: Pipeline) -> None:
    """Kill select_calibration while it holds its first output, complete, under the temporary name:
    Ctrl-C (SIGINT to dvc's whole process group), then SIGKILL to the stage's python alone."""
    repo, out = pipeline.repo, "outputs/calibration.parquet"
    proc, pid = pipeline.start_held("replace:calibration.parquet", "-f", "-s", "select_calibration")
    assert (repo / f"outputs/.tmp-calibration.parquet-{pid}").is_file()  # the kill lands mid-write
    os.killpg(proc.pid, signal.SIGINT)
    assert stop(proc) != 0
    printed = pipeline.log.read_text()  # Ctrl-C: one line from the stage, no traceback (issue 25)
    assert "[select_calibration] interrupted: no output of this stage was written" in printed, printed[-3000:]
    assert "Traceback" not in printed
    # every candidate had finished: each is kept for the rerun, which does not compute it again
    assert len(list(repo.glob("checkpoints/select_calibration/*/candidate-*.json"))) == 2
    pipeline.assert_absent_or_unchanged("select_calibration")
    assert not pipeline.leftovers()  # KeyboardInterrupt ran atomic_path's cleanup
    assert read_lock(repo) == pipeline.lock  # nothing recorded for the interrupted run
    # dvc.lock still describes the last complete run, so a plain repro restores it from the cache
    log = sh(repo, "dvc", "repro", "finetune")
    assert stages_run(log) == set() and "Stage 'select_calibration' is cached" in log
    pipeline.assert_unchanged("select_calibration")

    proc, pid = pipeline.start_held("replace:calibration.parquet", "-f", "-s", "select_calibration")
    os.kill(pid, signal.SIGKILL)
    assert stop(proc) != 0
    pipeline.assert_absent_or_unchanged("select_calibration")
    (tmp,) = pipeline.leftovers()  # SIGKILL skips every cleanup: the complete temporary stays
    assert tmp == repo / f"outputs/.tmp-calibration.parquet-{pid}"
    assert file_digests(tmp) == {".": pipeline.files[out]["."]}
    assert read_lock(repo) == pipeline.lock

    # run again: the same bytes, so nothing downstream has to run; the dead writer's temporary goes
    assert stages_run(sh(repo, "dvc", "repro", "-f", "-s", "select_calibration")) == {"select_calibration"}
    assert not pipeline.leftovers()
    pipeline.assert_unchanged("select_calibration")
    assert read_lock(repo) == pipeline.lock
    pipeline.assert_up_to_date()
    assert_cache_holds_only_final_outputs(repo, [pipeline.lock])


@pytest.mark.slow
def test_finetune_killed_mid_training_resumes_to_the_same_weights(pipeline: Pipeline) -> None:
    """SIGKILL the stage right after its step-2 checkpoint (of 4 steps); the next run resumes there
    and writes the weights of an uninterrupted run."""
    repo, model = pipeline.repo, "outputs/finetuned_model"
    proc, pid = pipeline.start_held("save:2", "-f", "-s", "finetune")
    os.kill(pid, signal.SIGKILL)
    assert stop(proc) != 0
    pipeline.assert_absent_or_unchanged("finetune")
    assert not pipeline.leftovers()
    (checkpoint,) = repo.glob("checkpoints/finetune/*/checkpoint-2")
    assert (checkpoint / "trainer_state.json").is_file()
    STASH["checkpoint"] = Path(shutil.copytree(checkpoint, pipeline.scratch / "checkpoint-2"))
    STASH["run"] = checkpoint.parent.relative_to(repo)

    # -f: a plain repro would restore the outputs dvc.lock records from the cache instead of resuming
    assert stages_run(sh(repo, "dvc", "repro", "-f", "-s", "finetune")) == {"finetune"}
    assert not pipeline.leftovers() and not any((repo / "checkpoints/finetune").iterdir())
    rerun = file_digests(repo / model)
    assert without_card(rerun) == without_card(pipeline.files[model])
    metrics = json.loads((repo / "metrics/finetune.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert drop(metrics, RUN_RECORD) == drop(pipeline.finetune_metrics, RUN_RECORD)
    lock = read_lock(repo)
    changed = {key for key, md5 in lock_outs(lock).items() if pipeline.outs[key] != md5}
    assert changed <= {("finetune", "metrics/finetune.json"), ("finetune", model)}
    pipeline.assert_up_to_date()
    assert_cache_holds_only_final_outputs(repo, [pipeline.lock, lock])
    shutil.rmtree(repo / model)
    sh(repo, "dvc", "checkout", "finetune")
    assert file_digests(repo / model) == rerun


@pytest.mark.slow
def test_finetune_killed_after_its_last_checkpoint_resumes_to_the_same_weights(pipeline: Pipeline) -> None:
    """SIGKILL the stage with the merged model written but not yet renamed into place."""
    repo, model = pipeline.repo, "outputs/finetuned_model"
    proc, pid = pipeline.start_held("replace:finetuned_model", "-f", "-s", "finetune")
    os.kill(pid, signal.SIGKILL)
    assert stop(proc) != 0
    pipeline.assert_absent_or_unchanged("finetune")
    (tmp,) = pipeline.leftovers()  # SIGKILL skips every cleanup: the complete temporary stays
    assert tmp == repo / f"outputs/.tmp-finetuned_model-{pid}"
    assert without_card(file_digests(tmp)) == without_card(pipeline.files[model])

    assert stages_run(sh(repo, "dvc", "repro", "-f", "-s", "finetune")) == {"finetune"}
    assert not pipeline.leftovers() and not any((repo / "checkpoints/finetune").iterdir())
    assert json.loads((repo / "metrics/finetune.json").read_text())["steps"] == 4
    assert without_card(file_digests(repo / model)) == without_card(pipeline.files[model])


@pytest.mark.slow
def test_finetune_resumes_past_a_checkpoint_cut_short(pipeline: Pipeline) -> None:
    if not STASH:
        pytest.skip("needs the checkpoint that test_finetune_killed_mid_training... leaves")
    repo, model = pipeline.repo, "outputs/finetuned_model"
    run = repo / STASH["run"]
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(STASH["checkpoint"], run / "checkpoint-2")
    # a kill during Trainer's save of step 4: everything but trainer_state.json (written last)
    shutil.copytree(STASH["checkpoint"], run / "checkpoint-4", ignore=shutil.ignore_patterns("trainer_state.json"))
    sh(repo, "dvc", "repro", "-f", "-s", "finetune")
    assert without_card(file_digests(repo / model)) == without_card(pipeline.files[model])
    assert json.loads((repo / "metrics/finetune.json").read_text())["resumed_from_step"] == 2


def drop(record: dict, keys: set[str]) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def without_card(files: dict[str, str]) -> dict[str, str]:
    assert CARD in files  # the stage wrote one
    return drop(files, {CARD})


def assert_cache_holds_only_final_outputs(repo: Path, locks: list[dict]) -> None:
    """Every object in DVC's cache is whole (its md5 is its name) and belongs to an output of a
    completed run: no interrupted run committed anything."""
    root = repo / ".dvc/cache/files/md5"
    cached = {p.parent.name + p.name: p for p in root.glob("*/*") if p.is_file()}
    known = set()
    for md5 in {md5 for lock in locks for md5 in lock_outs(lock).values()}:
        known.add(md5)
        if md5.endswith(".dir"):
            known |= {entry["md5"] for entry in json.loads(cached[md5].read_text())}
    assert cached.keys() <= known, f"cache objects of no final output: {sorted(cached.keys() - known)}"
    for md5, path in cached.items():
        if not md5.endswith(".dir"):
            assert hashlib.md5(path.read_bytes()).hexdigest() == md5, path


# nirvana/core/io.py on its own: fast, no DVC


def load_io():
    """nirvana/core/io.py without importing the package (which loads transformers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nirvana_io_alone", ROOT / "nirvana/core/io.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", ""])
    done.wait()
    return done.pid


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    io = load_io()
    path = tmp_path / "metrics.json"
    io.write_json({"a": 1}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_text('{"a": ')
        raise RuntimeError("interrupted")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_dead_writers_temporaries_are_removed_a_live_ones_kept(tmp_path: Path) -> None:
    io = load_io()
    dead = dead_pid()
    (tmp_path / f".tmp-model-{dead}").mkdir()
    (tmp_path / f".tmp-model-{dead}/model.safetensors").write_bytes(b"partial")
    (tmp_path / f".tmp-model.json-{dead}").write_text("{")  # another output's: not touched
    (tmp_path / ".tmp-model-1").mkdir()  # pid 1 always runs
    with io.atomic_path(tmp_path / "model") as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-model-1", f".tmp-model.json-{dead}", "model"]


def test_sigkill_mid_write_keeps_the_old_file_whole(tmp_path: Path) -> None:
    """Without DVC (which deletes a stage's outputs before running it), a kill between writing
    the temporary and renaming it leaves the previous file exactly as it was."""
    path = tmp_path / "table.json"
    path.write_text('{"old": true}\n')
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("io_alone", {str(ROOT / "nirvana/core/io.py")!r})
        io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)
        with io.atomic_path({str(path)!r}) as tmp:
            tmp.write_text('{{"new": true}}\\n')
            print("written", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout and proc.stdout.readline() == "written\n"
    proc.kill()
    proc.wait()
    assert path.read_text() == '{"old": true}\n'
    assert (tmp_path / f".tmp-table.json-{proc.pid}").read_text() == '{"new": true}\n'
