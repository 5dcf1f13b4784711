"""Same params and code under two different native CPU levels: the tiny pipeline (a random 2-layer Llama with a
byte-level BPE tokenizer) run by `dvc repro` with ATEN_CPU_CAPABILITY=default in the parent (the session's shared
run, tests/conftest.py's `tiny_run`), then rerun from nothing by `nirvana audit` with the parent's variable unset
(this CPU's best level), records the same hash for every output but the timing files: the project's pin
(cpu.kernels: portable) wins over the parent. The run's numbers also match the committed table
tests/data/tiny_pipeline.json, on whatever machine CI runs."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pipeline_fixture import copy_run, dvc_env, lock_outs, read_lock, sh, stages_run

from nirvana.core.environment import PORTABLE
from nirvana.evaluation.timings import TIMING_FILES, is_timed
from nirvana.pipeline.audit import cache_object

ROOT = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


def workspace_files(repo: Path) -> list[Path]:
    """Every file in the checkout outside git's and DVC's own folders."""
    return [p for p in repo.rglob("*") if p.is_file() and not {".git", ".dvc"} & set(p.relative_to(repo).parts)]


def fingerprint(repo: Path) -> dict[str, str]:
    """md5 of every number a run computed: each model, table and GGUF file under outputs/ and plots/, and each
    metrics file without its digests (a digest covers model cards, which name the code's hash and change with
    any code edit); model cards and timings/ left out."""
    found: dict[str, str] = {}
    for path in sorted([*(repo / "outputs").rglob("*"), *(repo / "plots").rglob("*")]):
        if path.is_file() and path.suffix in (".safetensors", ".parquet", ".gguf"):
            found[path.relative_to(repo).as_posix()] = hashlib.md5(path.read_bytes()).hexdigest()
        elif path.is_file() and path.suffix == ".csv":  # plots/models.csv repeats the metrics' digests
            table = pd.read_csv(path)
            table = table[[c for c in table.columns if not c.endswith("digest")]].to_csv(index=False)
            found[path.relative_to(repo).as_posix()] = hashlib.md5(table.encode()).hexdigest()
    for path in sorted((repo / "metrics").glob("*.json")):
        data = without_digests(json.loads(path.read_text()))
        found[f"metrics/{path.name}"] = hashlib.md5(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return found


def without_digests(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_digests(v) for k, v in value.items() if not k.endswith(("digest", "sha256"))}
    return [without_digests(v) for v in value] if isinstance(value, list) else value


@pytest.fixture(scope="module")
def committed(tiny_run: Path) -> Path:
    """The shared tiny run: reproduced with the parent asking for ATen's plainest kernels, and committed."""
    return tiny_run


@pytest.fixture
def damaged(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of that run for a test to break: the shared one stays as committed."""
    return copy_run(tiny_run, tmp_path / "repo")


@pytest.fixture(scope="module")
def audited(committed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """`nirvana audit` of that run, the parent's CPU variables unset, its scratch clone kept."""
    scratch = tmp_path_factory.mktemp("audit") / "repo"
    parent = {k: v for k, v in dvc_env().items() if k not in PORTABLE}
    done = subprocess.run(
        [sys.executable, "-m", "nirvana.pipeline.cli", "audit", "--scratch", str(scratch)],
        cwd=committed,
        env=parent,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return done, scratch


@pytest.mark.slow
def test_the_audit_reproduces_every_output_under_another_native_level(
    committed: Path, audited: tuple[subprocess.CompletedProcess, Path]
) -> None:
    done, scratch = audited
    assert done.returncode == 0, done.stdout + done.stderr
    ran = stages_run((scratch / ".tmp-audit.log").read_text())
    assert ran == set(read_lock(scratch)), f"the audit skipped {set(read_lock(scratch)) - ran}"
    assert "bits promised" in done.stdout and "Audit passed" in done.stdout
    first, second = read_lock(committed), read_lock(scratch)
    one, two = lock_outs(first), lock_outs(second)
    assert (
        one.keys() == two.keys()
        and {("compare", "timings/compare.json"), ("measure_gguf", "timings/gguf.json")} <= one.keys()
    )
    differ = sorted(key for key in one if one[key] != two[key])
    assert not [key for key in differ if not key[1].startswith("timings/")], differ
    for stage in first:  # same sources, same upstream outputs
        assert first[stage].get("deps") == second[stage].get("deps"), stage
    # prepare_model and prepare_data are included: on a local model folder they are deterministic too
    assert {stage for stage, _ in one} >= {"prepare_model", "prepare_data", "select_calibration", "finetune"}
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| stage ")]
    assert len(rows) == len(one) and all("identical" in r or "timings" in r for r in rows)


@pytest.mark.slow
def test_the_run_matches_the_committed_table_of_numbers(committed: Path) -> None:
    """tests/data/tiny_pipeline.json: the tiny pipeline's numbers as committed. A change that moves them on
    purpose rewrites it: NIRVANA_UPDATE_FINGERPRINT=1 pytest tests/test_determinism.py."""
    found, table = fingerprint(committed), ROOT / "tests/data/tiny_pipeline.json"
    if os.environ.get("NIRVANA_UPDATE_FINGERPRINT") == "1":
        table.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    expected = json.loads(table.read_text())
    assert found.keys() == expected.keys()
    assert {k for k in found if found[k] != expected[k]} == set(), "numbers moved: see the docstring"
    assert len(found) > 20 and any(k.endswith(".safetensors") for k in found)


def leaf_keys(report: dict) -> list[str]:
    return [k for key, v in report.items() for k in (leaf_keys(v) if isinstance(v, dict) else [key])]


@pytest.mark.slow
def test_timing_files_hold_only_timings_and_the_machine(committed: Path) -> None:
    for timed, results in TIMING_FILES.items():
        kept, clocked = (json.loads((committed / path).read_text()) for path in (results, timed))
        machine = clocked.pop("machine")
        assert machine["cpu"] and machine["python"] and machine["cores"] >= 1
        assert clocked and all(is_timed(k) for k in leaf_keys(clocked)), timed
        assert not [k for k in leaf_keys(kept) if is_timed(k)], results
    efficiency = json.loads((committed / "metrics/efficiency.json").read_text())
    assert "speedup_ideal" in efficiency and "speedup_prefill_bs1" not in efficiency


@pytest.mark.slow
def test_workspace_is_clean_and_holds_no_pickle_files(committed: Path) -> None:
    first = committed
    assert "up to date" in sh(first, "dvc", "status")
    pickled = [p for p in workspace_files(first) if p.suffix in PICKLE_SUFFIXES]
    assert not pickled, f"the pipeline wrote pickle-format files: {pickled}"
    assert not [p for p in workspace_files(first) if p.name.startswith(".tmp-")]
    assert not any((first / "checkpoints/finetune").iterdir())  # fine-tuning checkpoints go on success
    model_files = {p.name for p in (first / "outputs/finetuned_model").iterdir()}
    assert "model.safetensors" in model_files


@pytest.mark.slow
def test_rerunning_prune_in_place_reproduces_its_outputs(audited: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, repo = audited  # the other tests read the committed checkout; this one changes the audit's clone
    before = {key: md5 for key, md5 in lock_outs(read_lock(repo)).items() if key[0] == "prune"}
    assert stages_run(sh(repo, "dvc", "repro", "-f", "-s", "prune")) == {"prune"}
    after = {key: md5 for key, md5 in lock_outs(read_lock(repo)).items() if key[0] == "prune"}
    assert after == before


@pytest.mark.slow
def test_the_audit_names_a_changed_package_before_any_work(damaged: Path) -> None:
    lock = damaged / "requirements.lock"
    text = lock.read_text()
    numpy = re.search(r"^numpy==(\S+)", text, re.M)
    assert numpy
    lock.write_text(text.replace(f"numpy=={numpy.group(1)}", "numpy==1.0.0"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nirvana.pipeline.cli", "audit"], cwd=damaged, capture_output=True, text=True
        )
    finally:
        lock.write_text(text)
    assert done.returncode == 1 and done.stdout == ""
    assert f"numpy: 1.0.0 locked, {numpy.group(1)} installed" in done.stderr


@pytest.mark.slow
def test_the_audit_names_an_output_whose_cached_bytes_changed(damaged: Path) -> None:
    """One byte flipped in the DVC cache's copy of the pruned model's weights: named, and nothing rerun."""
    (folder,) = [out for out in read_lock(damaged)["prune"]["outs"] if out["path"] == "outputs/pruned_model"]
    files = json.loads(cache_object(damaged, folder["md5"]).read_text())
    weights = cache_object(damaged, next(e["md5"] for e in files if e["relpath"] == "model.safetensors"))
    original = weights.read_bytes()
    weights.chmod(0o644)
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nirvana.pipeline.cli", "audit"], cwd=damaged, capture_output=True, text=True
        )
    finally:
        weights.write_bytes(original)
    assert done.returncode == 1 and "outputs/pruned_model/model.safetensors" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line: the reason and the one damaged file
