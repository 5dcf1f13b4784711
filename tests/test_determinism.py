"""Same params, same machine, same code: two `dvc repro` runs of the tiny pipeline (a random 2-layer
Llama with a word-level tokenizer) on the CPU record the same hash for every output in dvc.lock,
except the outputs that hold wall-clock measurements (listed in TIMED, with the reason).

Also the helpers for a tiny git+DVC checkout that tests/test_interruption.py shares."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import SMALL, checkout, sh, stages_run

from conftest import tiny_model_dir

# Small sizes on a tiny model: each stage costs little more than its imports.
TINY = {
    **SMALL,
    "calibration": SMALL["calibration"] | {"candidates": 2},
    "finetune": SMALL["finetune"] | {"steps": 4, "save_steps": 2},
    "evaluate": SMALL["evaluate"] | {"tasks": ["piqa"], "limit": 4},
}
# (stage, output) -> why two runs legitimately write different bytes
TIMED = {
    ("compare", "metrics/efficiency.json"): "prefill/generation latencies, tokens per second and the measured "
    "speedups (`*_ms`, `*_tokens_per_s`, `speedup_prefill_*`, `speedup_generate_*`) are wall-clock timings",
    ("measure_gguf", "metrics/gguf.json"): "llama.cpp's prompt and generation tokens per second and the speedups "
    "(`*_tokens_per_s`, `*_prompt_speedup`, `*_gen_speedup`) are wall-clock timings",
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


def tiny_checkout(repo: Path, model_dir: Path, overrides: dict | None = None) -> Path:
    """A git+DVC checkout of the pipeline in `repo` on the tiny model saved in `model_dir`."""
    return checkout(repo, TINY | {"model": {"name_or_path": str(model_dir)}} | (overrides or {}))


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment `sh` runs commands in (this venv's dvc and python first on PATH)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def read_lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def lock_outs(lock: dict) -> dict[tuple[str, str], str]:
    """(stage, output path) -> md5 recorded in dvc.lock, for every output (metrics included)."""
    return {(stage, out["path"]): out["md5"] for stage, entry in lock.items() for out in entry.get("outs", [])}


def file_digests(path: Path) -> dict[str, str]:
    """md5 of every file under `path` (or of `path` itself), by path relative to it."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {f.relative_to(path).as_posix(): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def workspace_files(repo: Path) -> list[Path]:
    """Every file in the checkout outside git's and DVC's own folders."""
    return [p for p in repo.rglob("*") if p.is_file() and not {".git", ".dvc"} & set(p.relative_to(repo).parts)]


def without_timings(report: dict) -> dict:
    """An efficiency report with its clock-measured entries left out."""
    timed = ("_ms", "_tokens_per_s", "_prompt_speedup", "_gen_speedup")

    def keep(key: str) -> bool:
        return not key.endswith(timed) and not (key.startswith("speedup_") and key != "speedup_ideal")

    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in report.items() if keep(k)}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny pipeline reproduced in two checkouts with identical sources (the second a copy of
    the first, so that nothing edited in between can slip in), both runs at the same time."""
    model = tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
    first = tiny_checkout(tmp_path_factory.mktemp("run1"), model)
    second = tmp_path_factory.mktemp("run2") / "repo"
    shutil.copytree(first, second, symlinks=True)
    logs = [repo.parent / "repro.log" for repo in (first, second)]
    runs = []
    for repo, log in zip((first, second), logs, strict=True):
        with log.open("w") as handle:
            runs.append(
                subprocess.Popen(["dvc", "repro"], cwd=repo, env=dvc_env(), stdout=handle, stderr=subprocess.STDOUT)
            )
    for run, log in zip(runs, logs, strict=True):
        assert run.wait(timeout=1200) == 0, f"dvc repro failed:\n{log.read_text()[-5000:]}"
        assert "compare" in stages_run(log.read_text())
    return first, second


@pytest.mark.slow
def test_two_runs_record_the_same_hash_for_every_output(two_runs: tuple[Path, Path]) -> None:
    first, second = (read_lock(repo) for repo in two_runs)
    assert first.keys() == second.keys()
    for stage in first:  # same sources, same upstream outputs
        assert first[stage].get("deps") == second[stage].get("deps"), stage
    one, two = lock_outs(first), lock_outs(second)
    assert one.keys() == two.keys() and set(TIMED) <= one.keys()
    differ = sorted(key for key in one if one[key] != two[key])
    unexpected = [key for key in differ if key not in TIMED]
    assert not unexpected, f"outputs that differ between two identical runs: {unexpected}"
    # prepare_model and prepare_data are included: on a local model folder they are deterministic too
    assert {stage for stage, _ in one} >= {"prepare_model", "prepare_data", "select_calibration", "finetune"}


@pytest.mark.slow
def test_timed_outputs_differ_in_timings_only(two_runs: tuple[Path, Path]) -> None:
    for _, path in TIMED:
        one, two = (json.loads((repo / path).read_text()) for repo in two_runs)
        assert without_timings(one) == without_timings(two) and one.keys() == two.keys()
    efficiency = json.loads((two_runs[0] / "metrics/efficiency.json").read_text())
    assert "speedup_ideal" in without_timings(efficiency)


@pytest.mark.slow
def test_workspace_is_clean_and_holds_no_pickle_files(two_runs: tuple[Path, Path]) -> None:
    first, _ = two_runs
    assert "up to date" in sh(first, "dvc", "status")
    pickled = [p for p in workspace_files(first) if p.suffix in PICKLE_SUFFIXES]
    assert not pickled, f"the pipeline wrote pickle-format files: {pickled}"
    assert not [p for p in workspace_files(first) if p.name.startswith(".tmp-")]
    assert not any((first / "checkpoints/finetune").iterdir())  # fine-tuning checkpoints go on success
    model_files = {p.name for p in (first / "outputs/finetuned_model").iterdir()}
    assert "model.safetensors" in model_files


@pytest.mark.slow
def test_rerunning_prune_in_place_reproduces_its_outputs(two_runs: tuple[Path, Path]) -> None:
    _, repo = two_runs  # the other tests read the first checkout; this one changes the second
    before = {key: md5 for key, md5 in lock_outs(read_lock(repo)).items() if key[0] == "prune"}
    assert stages_run(sh(repo, "dvc", "repro", "-f", "-s", "prune")) == {"prune"}
    after = {key: md5 for key, md5 in lock_outs(read_lock(repo)).items() if key[0] == "prune"}
    assert after == before
