"""T5 through the whole pipeline: no real T5 weights exist offline, so a small random T5 (saved as a
local Hugging Face folder with a word-level tokenizer) goes through `dvc repro` end to end."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from pipeline_fixture import SMALL, checkout, sh, stages_run
from transformers import AutoModelForSeq2SeqLM

from conftest import save_tokenizer, tiny_t5
from nirvana.core.data import read_windows
from nirvana.method.forward import model_inputs
from nirvana.method.surgery import zero_model


@pytest.fixture(scope="module")
def t5_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("t5_model")
    tiny_t5("gated-gelu").save_pretrained(model_dir)
    save_tokenizer(model_dir)
    overrides = {
        **SMALL,
        "model": {"name_or_path": str(model_dir)},
        "sparsity": 0.3,
        "finetune": SMALL["finetune"] | {"steps": 2},
    }
    repo = checkout(tmp_path_factory.mktemp("pipeline_t5"), overrides)
    log = sh(repo, "dvc", "repro")
    assert {"compute_saliency", "prune", "finetune", "evaluate@pruned", "compare"} <= stages_run(log)
    return repo


@pytest.mark.slow
def test_t5_repro_prunes_both_stacks_and_measures_everything(t5_repo: Path) -> None:
    prune = json.loads((t5_repo / "metrics/prune.json").read_text())
    assert prune["sparsity_realised"] == pytest.approx(0.3, abs=0.05)
    pruned = AutoModelForSeq2SeqLM.from_pretrained(t5_repo / "outputs/pruned_model").eval()
    units = pruned.config.nirvana_units
    assert len(units) == 5 and all("cross" in u for u in units[3:]) and not any("cross" in u for u in units[:3])
    widths = (t5_repo / "plots/widths.csv").read_text().splitlines()[0]
    assert "cross_kept" in widths and "mlp_kept" in widths
    for key in ("dense", "pruned", "finetuned"):
        metrics = json.loads((t5_repo / f"metrics/{key}.json").read_text())
        assert metrics["ppl_wiki_64"] > 1 and 0 <= metrics["acc_piqa"] <= 1
    efficiency = json.loads((t5_repo / "metrics/efficiency.json").read_text())
    assert (
        efficiency["speedup_ideal"] > 1 and efficiency["pruned"]["params_total"] < efficiency["dense"]["params_total"]
    )
    # the pruned model equals the dense one with the planned units zeroed, on prefix-LM inputs
    dense = AutoModelForSeq2SeqLM.from_pretrained(t5_repo / "outputs/base_model").eval()
    zero_model(dense, pd.read_parquet(t5_repo / "outputs/plan.parquet"))
    inputs = model_inputs(dense, read_windows(t5_repo / "outputs/calibration.parquet")[:2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, dense(**inputs).logits, atol=1e-5, rtol=1e-5)
