"""Experiments on the tiny pipeline through DVC: a change of sparsity reruns only what depends on it, a sweep
restores what an experiment computed and measures the dense GGUF once, and the README's commands go back to
the committed run. The session's experiment (tests/conftest.py's `tiny_experiment`) is a copy of the tiny run
changed by `dvc exp run -S sparsity=0.4`; a test that changes it works on a `copy_run` of it."""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_fixture import EXPERIMENT_SPARSITY, MODELS, ROOT, Experiment, copy_run, sh, stages_run

pytestmark = pytest.mark.slow  # each test runs dvc and stages


def sparsity(repo: Path) -> float:
    return json.loads((repo / "metrics/prune.json").read_text())["sparsity_realised"]


def test_second_repro_does_nothing_and_a_sparsity_change_reruns_only_downstream(
    tiny_experiment: Experiment, tiny_run: Path
) -> None:
    again, log, repo = tiny_experiment.repro_log, tiny_experiment.log, tiny_experiment.repo
    assert stages_run(again) == set() and "up to date" in again
    # The search reruns (it depends on sparsity) but is pinned at 0.2: same windows, same bytes,
    # so the cached saliency and the dense evaluation are reused.
    downstream = {"allocate_sparsity", "prune", "finetune", "evaluate@pruned", "evaluate@finetuned", "compare"}
    # the dense model's GGUF and its perplexities (export_gguf@dense, gguf_perplexity@dense) are reused too
    downstream |= {f"{stage}@{model}" for stage in ("export_gguf", "gguf_perplexity") for model in MODELS[1:]}
    downstream |= {"measure_gguf"}
    # check_params and check_inputs rerun (params.yaml changed) but write the same keys and checks: nothing
    # after them reruns for them
    assert stages_run(log) == {"check_params", "check_inputs", "select_calibration", "publish"} | downstream
    calibration = "outputs/calibration.parquet"
    assert (repo / calibration).read_bytes() == (tiny_run / calibration).read_bytes()
    assert yaml.safe_load((repo / "params.yaml").read_text())["sparsity"] == EXPERIMENT_SPARSITY
    assert sparsity(repo) > sparsity(tiny_run)


def experiment_refs(repo: Path) -> set[str]:
    return set(sh(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split())


def test_a_sweep_measures_the_dense_gguf_perplexity_once(tiny_experiment: Experiment, tmp_path: Path) -> None:
    """`nirvana sweep` runs through measure_gguf, so each row carries llama.cpp speedups; the dense model's GGUF
    and perplexities depend on nothing a sweep changes: export_gguf@dense and gguf_perplexity@dense do not run
    in the experiment, which carries the committed run's dense llama.cpp and transformers perplexity. Sparsity
    0.4 comes back from the run-cache of the session's experiment: a sweep restores what it can, and the dense
    stages must not even be restored."""
    repo = copy_run(tiny_experiment.repo, tmp_path / "repo")
    sh(repo, "git", "checkout", "--", ".")  # the committed run in the workspace, as a sweep starts on main
    sh(repo, "dvc", "checkout")
    before = experiment_refs(repo)
    sweep = ["-m", "nirvana.pipeline.cli", "sweep", "--methods", "nirvana", "--sparsities", str(EXPERIMENT_SPARSITY)]
    log = sh(repo, sys.executable, *sweep)
    ran, cached = stages_run(log), set(re.findall(r"Stage '([^']+)' is cached", log))
    assert {"gguf_perplexity@pruned", "gguf_perplexity@finetuned", "measure_gguf"} <= ran | cached, log[-3000:]
    assert not {f"{stage}@dense" for stage in ("evaluate", "export_gguf", "gguf_perplexity")} & (ran | cached)
    lock = lambda ref: yaml.safe_load(sh(repo, "git", "show", f"{ref}:dvc.lock"))["stages"]  # noqa: E731
    gguf = lambda ref: json.loads(sh(repo, "git", "show", f"{ref}:metrics/gguf.json"))  # noqa: E731
    dense = {stage: lock("HEAD")[f"{stage}@dense"] for stage in ("export_gguf", "gguf_perplexity")}
    committed = gguf("HEAD")
    (ref,) = experiment_refs(repo) - before
    assert {stage: lock(ref)[f"{stage}@dense"] for stage in dense} == dense
    assert gguf(ref)["f16"]["dense"]["ppl_wiki_64"] == committed["f16"]["dense"]["ppl_wiki_64"]
    assert gguf(ref)["transformers"]["dense"] == committed["transformers"]["dense"]
    assert gguf(ref)["f16"]["pruned"]["ppl_wiki_64"] != committed["f16"]["pruned"]["ppl_wiki_64"]
    table = sh(repo, sys.executable, "-m", "nirvana.pipeline.cli", "report", "--all").splitlines()
    header = [cell.strip() for cell in table[0].split("|")]
    column = header.index("speedup_llamacpp_f16_gen")
    name = ref.rsplit("/", 1)[1]
    swept = [line.split("|") for line in table[2:] if line.startswith("|") and line.split("|")[1].strip() == name]
    assert len(swept) == 2 and all(float(row[column]) > 0 for row in swept)  # pruned and fine-tuned


def readme_block(title: str) -> list[str]:
    """The commands of the README's indented block that follows the paragraph starting with `title`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    block = []
    for line in lines[start + 1 :]:
        if line.startswith("    "):
            block.append(line.split(" #")[0].strip())
        elif block:
            return block
    return block


def test_the_readme_commands_go_back_to_the_committed_run(
    tiny_experiment: Experiment, tiny_run: Path, tmp_path: Path
) -> None:
    """After an experiment in the workspace, with a committed output this clone's cache lacks (a fresh clone
    whose first run was an experiment), the README's commands give back the committed params, lock, metrics
    and outputs: git and DVC both clean. The old advice (`git checkout -- params.yaml dvc.lock && dvc
    checkout`) failed here and left the experiment's metrics behind."""
    repo = copy_run(tiny_experiment.repo, tmp_path / "repo")
    committed = yaml.safe_load(sh(repo, "git", "show", "HEAD:dvc.lock"))
    (release,) = committed["stages"]["publish"]["outs"]
    (repo / ".dvc/cache/files/md5" / release["md5"][:2] / release["md5"][2:]).unlink()
    commands = readme_block("**Go back to the committed results**")
    assert [c.split()[:2] for c in commands] == [["git", "checkout"], ["dvc", "checkout"], ["dvc", "repro"]]
    for command in commands:
        sh(repo, *shlex.split(command))
    assert sh(repo, "git", "status", "--porcelain") == ""
    assert "up to date" in sh(repo, "dvc", "status")
    assert sparsity(repo) == sparsity(tiny_run)
