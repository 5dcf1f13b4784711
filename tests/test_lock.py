"""Main's dvc.lock describes main: every tracked dependency and output has the hash the lock records,
every param the recorded value, every stage an entry. Otherwise the committed metrics and the README's
numbers belong to other code, and this test says which stages and files, and what to run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nirvana.pipeline.lockcheck import FIX, lock_report, stale_stages, tracked_files

ROOT = Path(__file__).resolve().parents[1]


def test_main_lock_describes_the_tree() -> None:
    stale = stale_stages(ROOT)
    assert not stale, lock_report(stale)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The tracked files of this checkout, committed in a new repository (no outputs: as a fresh clone)."""
    for name in tracked_files(ROOT):
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    return tmp_path


def test_an_edited_module_a_changed_param_and_a_missing_entry_are_named(copy: Path) -> None:
    before = stale_stages(copy)  # empty when this checkout is fresh (test above)
    with (copy / "nirvana/evaluation/perplexity.py").open("a") as handle:
        handle.write("# edited\n")
    params = yaml.safe_load((copy / "params.yaml").read_text())
    (copy / "params.yaml").write_text(yaml.safe_dump(params | {"sparsity": 0.35}))
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    del lock["stages"]["compare"]
    (copy / "dvc.lock").write_text(yaml.safe_dump(lock))
    stale = stale_stages(copy)
    assert "params.yaml: sparsity modified" in stale["allocate_sparsity"]
    assert stale["compare"] == ["no entry in dvc.lock"]
    assert "nirvana/evaluation/perplexity.py modified" in stale["evaluate@dense"]
    assert stale.get("prepare_model") == before.get("prepare_model")  # prepare_model never imports perplexity
    report = lock_report(stale)
    assert "evaluate@dense: " in report and report.endswith(f"To fix: {FIX}.")


def test_a_committed_metric_that_differs_from_the_lock_is_named(copy: Path) -> None:
    assert not any(line.startswith("metrics/prune.json") for line in stale_stages(copy).get("prune", []))
    (copy / "metrics/prune.json").write_text('{"sparsity_realised": 0.5}\n')
    assert any(line.startswith("metrics/prune.json modified") for line in stale_stages(copy)["prune"])
