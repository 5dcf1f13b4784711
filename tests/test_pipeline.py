"""The real pipeline on the embedded SmolLM2-135M, end to end through DVC, at a small size (experiments and
sweeps: tests/test_experiments.py, on the tiny pipeline)."""

import hashlib
import json
import math
import re
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from pipeline_fixture import MODELS, SMALL, checkout, dvc_env, sh, stages_run
from transformers import AutoModelForCausalLM

from nirvana.deploy.card import read_card
from nirvana.deploy.verify import verify_folder
from nirvana.evaluation.timings import rejoin
from nirvana.method.surgery import zero_model


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
