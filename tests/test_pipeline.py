"""The real pipeline on the embedded SmolLM2-135M, end to end through DVC, at a small size."""

import hashlib
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from pipeline_fixture import ROOT, SMALL, checkout, dvc_env, sh, stages_run
from transformers import AutoModelForCausalLM

from nirvana.deploy.card import read_card
from nirvana.deploy.verify import verify_folder
from nirvana.evaluation.timings import rejoin
from nirvana.method.surgery import zero_model

MODELS = ("dense", "pruned", "finetuned")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline with small sizes on the embedded SmolLM2, reproduced once."""
    repo = checkout(tmp_path_factory.mktemp("pipeline"), SMALL)
    log = sh(repo, "dvc", "repro")
    expected = {"check_params", "prepare_model", "compute_saliency", "prune", "finetune", "compare", "publish"}
    expected |= {f"{stage}@{model}" for stage in ("evaluate", "export_gguf", "gguf_perplexity") for model in MODELS}
    assert expected | {"measure_gguf"} <= stages_run(log)
    ran = re.findall(r"Running stage '([^']+)'", log)  # publish first: a failing llama.cpp cannot hold it back
    assert ran.index("publish") < min(ran.index(f"{stage}@dense") for stage in ("export_gguf", "gguf_perplexity"))
    sh(repo, "git", "add", "-A")  # the committed run: its lock, metrics and plots, as on main
    sh(repo, "git", "commit", "-qm", "run")
    return repo


@pytest.mark.slow
def test_metrics_list_dense_and_pruned_perplexities(repo: Path) -> None:
    dense = json.loads((repo / "metrics/dense.json").read_text())
    pruned = json.loads((repo / "metrics/pruned.json").read_text())
    for name in ("ppl_wiki_64", "ppl_books_64"):
        assert 1 < dense[name] < pruned[name] < 10_000
    for metrics in (dense, pruned):
        assert 0 <= metrics["acc_piqa"] <= 1 and metrics["acc_average"] == metrics["acc_piqa"]
    efficiency = json.loads((repo / "metrics/efficiency.json").read_text())
    timed = json.loads((repo / "timings/compare.json").read_text())
    assert 1 < efficiency["speedup_ideal"] < 1.5
    ratio = timed["dense"]["prefill_bs1_ms"] / timed["pruned"]["prefill_bs1_ms"]
    assert timed["speedup_prefill_bs1"] == pytest.approx(ratio, abs=1e-3)  # the speedup is the timed ratio
    assert "speedup_prefill_bs1" not in efficiency and timed["machine"]["cpu"]
    assert efficiency["pruned"]["weights_mb"] < efficiency["dense"]["weights_mb"]
    prune = json.loads((repo / "metrics/prune.json").read_text())
    assert prune["sparsity_realised"] == pytest.approx(0.2, abs=0.005)
    assert pruned["params_total"] == prune["pruned"]["params_total"] < dense["params_total"]
    finetuned = json.loads((repo / "metrics/finetuned.json").read_text())
    assert finetuned["params_total"] == pruned["params_total"] and finetuned["ppl_wiki_64"] != pruned["ppl_wiki_64"]
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    assert finetune["steps"] == 4 and finetune["world_size"] == 1 and math.isfinite(finetune["loss_last"])
    assert not any((repo / "checkpoints/finetune").iterdir())
    calibration = json.loads((repo / "metrics/calibration.json").read_text())
    table = pd.read_parquet(repo / "outputs/calibration_candidates.parquet")
    assert table.kl.nunique() == 2 and calibration["kl_selected"] == table.kl.min() < calibration["kl_worst"]
    # candidates judged at the grid's middle gamma; allocation visits 7 of the 9 gammas, that one among them
    plans = pd.read_parquet(repo / "outputs/plan_candidates.parquet")
    assert table.gamma.tolist() == [4.0, 4.0] and len(plans) == 7
    assert plans.loc[plans.gamma == 4.0, "kl"].item() == calibration["kl_selected"]


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_models_as_transformers_scores_them(repo: Path) -> None:
    """f16 GGUFs in a real llama.cpp: perplexity within 0.1% of transformers' on the same tokens (the first
    export.ppl_tokens of evaluate's wiki windows), for the dense, pruned and fine-tuned models; the files are the
    ones the manifests hash; a speedup is the median of its rounds' paired ratios."""
    report = rejoin(*(json.loads((repo / f"{kind}/gguf.json").read_text()) for kind in ("metrics", "timings")))
    f16 = report["f16"]
    assert report["ppl_tokens"] == 256
    for name in MODELS:
        measured = json.loads((repo / f"metrics/gguf_ppl_{name}.json").read_text())
        ours = measured["transformers"]["ppl_wiki_64"]
        assert measured["f16"]["ppl_wiki_64"] == pytest.approx(ours, rel=1e-3), name  # measured: within 2e-4
        assert f16[name]["ppl_wiki_64"] == measured["f16"]["ppl_wiki_64"] and report["transformers"][name] == {
            "ppl_wiki_64": ours
        }
        assert f16[name]["fallbacks"] == 0
        manifest = json.loads((repo / f"outputs/gguf/{name}/export.json").read_text())["exported"]["f16"]
        gguf = repo / "outputs/gguf" / name / manifest["gguf"]
        assert hashlib.sha256(gguf.read_bytes()).hexdigest() == manifest["sha256"] == measured["f16"]["sha256"]
    assert f16["pruned"]["mib"] < f16["dense"]["mib"] and f16["pruned_bytes_ratio"] > 1
    assert 1 < report["ideal_flop_ratio"] < 1.5
    ratios = [d / p for d, p in zip(f16["dense"]["gen_seconds"], f16["pruned"]["gen_seconds"], strict=True)]
    assert 2 <= f16["rounds"] == len(ratios) <= 3
    assert f16["pruned_gen_speedup"] == round(statistics.median(ratios), 4)  # the speedup is the paired ratio
    assert f16["pruned_gen_speedup_spread"] > 0
    assert report["pruned_digest"] == json.loads((repo / "metrics/pruned.json").read_text())["model_digest"]


@pytest.mark.slow
def test_real_pruned_model_equals_masked_dense_and_generates(repo: Path) -> None:
    pruned = AutoModelForCausalLM.from_pretrained(repo / "outputs/pruned_model").eval()
    dense = AutoModelForCausalLM.from_pretrained(repo / "outputs/base_model").eval()
    zero_model(dense, pd.read_parquet(repo / "outputs/plan.parquet"))
    tokens = torch.tensor(pd.read_parquet(repo / "outputs/calibration.parquet")["input_ids"][0][None, :32].tolist())
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(input_ids=tokens).logits, dense(input_ids=tokens).logits, atol=1e-4, rtol=1e-4
        )
        out = pruned.generate(input_ids=tokens[:, :8], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 16)


@pytest.mark.slow
def test_second_repro_does_nothing_and_a_sparsity_change_reruns_only_downstream(repo: Path) -> None:
    again = sh(repo, "dvc", "repro")
    assert stages_run(again) == set() and "up to date" in again
    selected = (repo / "outputs/calibration.parquet").read_bytes()
    log = sh(repo, "dvc", "exp", "run", "-S", "sparsity=0.4")
    # The search reruns (it depends on sparsity) but is pinned at 0.2: same windows, same bytes,
    # so the cached saliency and the dense evaluation are reused.
    downstream = {"allocate_sparsity", "prune", "finetune", "evaluate@pruned", "evaluate@finetuned", "compare"}
    # the dense model's GGUF and its perplexities (export_gguf@dense, gguf_perplexity@dense) are reused too
    downstream |= {f"{stage}@{model}" for stage in ("export_gguf", "gguf_perplexity") for model in MODELS[1:]}
    downstream |= {"measure_gguf"}
    # check_params and check_inputs rerun (params.yaml changed) but write the same keys and checks: nothing
    # after them reruns for them
    assert stages_run(log) == {"check_params", "check_inputs", "select_calibration", "publish"} | downstream
    assert (repo / "outputs/calibration.parquet").read_bytes() == selected
    prune = json.loads((repo / "metrics/prune.json").read_text())
    assert prune["sparsity_realised"] == pytest.approx(0.4, abs=0.005)


def experiment_refs(repo: Path) -> set[str]:
    return set(sh(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split())


@pytest.mark.slow
def test_a_sweep_measures_the_dense_gguf_perplexity_once(repo: Path) -> None:
    """`nirvana sweep` runs through measure_gguf, so each row carries llama.cpp speedups; the dense model's GGUF
    and perplexities depend on nothing a sweep changes: export_gguf@dense and gguf_perplexity@dense do not run
    in the experiment, which carries the committed run's dense llama.cpp and transformers perplexity. Sparsity
    0.4 comes back from the run-cache of the experiment above (computed when this test runs alone): a sweep
    restores what it can, and the dense stages must not even be restored."""
    sh(repo, "git", "checkout", "--", ".")  # the committed run in the workspace, as a sweep starts on main
    sh(repo, "dvc", "checkout")
    before = experiment_refs(repo)
    sweep = ["-m", "nirvana.pipeline.cli", "sweep", "--methods", "nirvana", "--sparsities", "0.4"]
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


@pytest.mark.slow
def test_published_card_carries_the_measured_results_and_verifies(repo: Path) -> None:
    release, tuned = repo / "outputs/release", repo / "outputs/finetuned_model"
    for path in tuned.iterdir():
        assert path.name == "README.md" or (release / path.name).read_bytes() == path.read_bytes()
    meta = read_card(release)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    results = meta["model-index"][0]["results"]
    metrics = json.loads((repo / "metrics/finetuned.json").read_text())
    found = {(r["dataset"]["name"], r["metrics"][0]["type"]): r["metrics"][0]["value"] for r in results}
    assert found[("BoolQ validation passages (wiki)", "perplexity")] == metrics["ppl_wiki_64"]
    assert found[("PIQA", "acc")] == metrics["acc_piqa"]
    assert verify_folder(release)[0] and meta["nirvana"]["stage"] == "publish"


@pytest.mark.slow
def test_a_misspelt_param_fails_repro_at_once_naming_it(repo: Path) -> None:
    params = (repo / "params.yaml").read_text()
    try:
        # a real change too: check_params must stop the run before allocate_sparsity starts
        changed = yaml.safe_load(params) | {"sparsity": 0.3, "sparsty": 0.3}
        (repo / "params.yaml").write_text(yaml.safe_dump(changed))
        done = subprocess.run(["dvc", "repro"], cwd=repo, env=dvc_env(), capture_output=True, text=True)
        assert done.returncode != 0
        assert "unknown key sparsty; did you mean sparsity?" in done.stdout + done.stderr
        assert stages_run(done.stdout + done.stderr) == {"check_params"}
    finally:
        (repo / "params.yaml").write_text(params)


@pytest.mark.slow
def test_calibration_depends_on_the_file_it_reads_not_on_its_folder(repo: Path) -> None:
    """A file dropped into data/calibration/ reruns nothing; naming it in calibration.path reruns the search."""
    other = repo / "data/calibration/other.parquet"
    pd.DataFrame({"text": ["a passage of someone else's"]}).to_parquet(other)
    try:
        assert "select_calibration" not in sh(repo, "dvc", "status")
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["select_calibration"]
        assert [d["path"] for d in lock["deps"] if d["path"].startswith("data/")] == []
    finally:
        other.unlink()


@pytest.mark.slow
def test_the_pruned_card_names_the_calibration_pool_and_its_hash(repo: Path) -> None:
    calibration = read_card(repo / "outputs/pruned_model")["nirvana"]["calibration"]
    pool = repo / "outputs/corpora/calibration.parquet"
    assert calibration["pool"] == "outputs/corpora/calibration.parquet"
    assert calibration["pool_sha256"] == hashlib.sha256(pool.read_bytes()).hexdigest()
    assert calibration["windows"] == SMALL["calibration"]["num_samples"]


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


@pytest.mark.slow
def test_the_readme_commands_go_back_to_the_committed_run(repo: Path) -> None:
    """After an experiment in the workspace, with a committed output this clone's cache lacks (a fresh clone
    whose first run was an experiment), the README's commands give back the committed params, lock, metrics
    and outputs: git and DVC both clean. The old advice (`git checkout -- params.yaml dvc.lock && dvc
    checkout`) failed here and left the experiment's metrics behind."""
    sh(repo, "dvc", "exp", "run", "-S", "sparsity=0.4")  # restored from the run-cache if an earlier test ran it
    committed = yaml.safe_load(sh(repo, "git", "show", "HEAD:dvc.lock"))
    (release,) = committed["stages"]["publish"]["outs"]
    (repo / ".dvc/cache/files/md5" / release["md5"][:2] / release["md5"][2:]).unlink()
    commands = readme_block("**Go back to the committed results**")
    assert [c.split()[:2] for c in commands] == [["git", "checkout"], ["dvc", "checkout"], ["dvc", "repro"]]
    for command in commands:
        sh(repo, *shlex.split(command))
    assert sh(repo, "git", "status", "--porcelain") == ""
    assert "up to date" in sh(repo, "dvc", "status")
    assert json.loads((repo / "metrics/prune.json").read_text())["sparsity_realised"] == pytest.approx(0.2, abs=0.005)
