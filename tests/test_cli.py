"""The `nirvana` command line: models stay where they belong on a GPU machine, and every command stops on a
user's mistake with one line on stderr and exit code 1."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig

import nirvana.models.loading
import nirvana.pipeline.report
from conftest import tiny_llama, tiny_model_dir
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.evaluation.perplexity import param_counts
from nirvana.models import GRANULARITY_KEY, get_adapter
from nirvana.pipeline.cli import main

GPU = torch.device("meta")  # stands in for a GPU: tensors there are not on the CPU


def test_generate_puts_the_prompt_on_the_models_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_model_dir(tmp_path / "model")
    monkeypatch.setattr(nirvana.models.loading, "device", lambda: GPU)
    seen = []

    def generate(self: LlamaForCausalLM, **inputs: torch.Tensor) -> torch.Tensor:
        seen.extend((self.device, *(v.device for v in inputs.values() if isinstance(v, torch.Tensor))))
        return torch.tensor([[1, 2, 3]])

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    main(["generate", str(folder), "w0 w1", "--max-new-tokens", "1"])
    assert len(seen) > 1 and set(seen) == {GPU}
    assert capsys.readouterr().out == "w0 w1 w2\n"


def test_info_counts_parameters_without_moving_weights_to_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_model_dir(tmp_path / "model")
    expected = param_counts(tiny_llama("gqa"))  # the model tiny_model_dir saved
    monkeypatch.setattr(nirvana.models.loading, "device", lambda: GPU)
    moved = []
    to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append((a, k)) or to(self, *a, **k))
    main(["info", str(folder)])
    out = capsys.readouterr().out
    assert moved == []
    assert f'"params_total": {expected["params_total"]},' in out
    assert f'"params_attn_mlp": {expected["params_attn_mlp"]},' in out


def gpt2_folder(path: Path) -> Path:
    """A real (tiny) model folder of an architecture the pipeline does not prune."""
    config = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The message `nirvana ARGV` stops with, after checking it is one line on stderr and exit code 1."""
    capsys.readouterr()  # what the set-up printed
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["info", "{tmp}/missing"], r"^nirvana info: {tmp}/missing/config.json: not found"),
        (["generate", "{tmp}/missing", "w0"], r"^nirvana generate: {tmp}/missing/config.json: not found"),
        (["info", "{tmp}/gpt2"], r"^nirvana info: {tmp}/gpt2: model_type 'gpt2' is not supported; supported: "),
        (["export", "{tmp}/missing", "outputs/m.gguf"], r"^nirvana export: .*no config\.json"),
        (["sweep", "--sparsities", "1.5"], r"^nirvana sweep: sparsity 1.5 is invalid"),
        (["report", "--readme", "--sort", "acc_average"], r"^nirvana report: --readme .* takes no --sort"),
        (["report", "--readme", "--all"], r"^nirvana report: --readme .* takes no --all"),
    ],
)
def test_a_users_mistake_stops_every_command_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    gpt2_folder(tmp_path / "gpt2")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert re.search(expected.format(tmp=re.escape(str(tmp_path))), one_line_error(argv, capsys))


def test_report_outside_the_repository_stops_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert one_line_error(["report", "--readme"], capsys).startswith("nirvana report: params.yaml: not found; ")
    refused = subprocess.CompletedProcess([], 255, stdout="", stderr="ERROR: you are not inside of a DVC repository")
    monkeypatch.setattr(nirvana.pipeline.report, "dvc", lambda *args: refused)
    message = one_line_error(["report"], capsys)
    assert message == "nirvana report: dvc exp show failed: ERROR: you are not inside of a DVC repository"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (GPT2Config(), r"model_type 'gpt2' is not supported; supported: gemma3_text, llama"),
        (
            LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **{GRANULARITY_KEY: "query_head"}),
            r"attention\.granularity = 'query_head' needs grouped-query attention; .*\(4 query heads, 4 KV heads\)",
        ),
    ],
)
def test_a_model_the_pipeline_cannot_prune_stops_a_stage_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: PretrainedConfig, expected: str
) -> None:
    shutil.copy(Path(__file__).parents[1] / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare_model.py"])

    def prepare_model(params: Params) -> None:
        get_adapter(config)  # as stages/prepare_model.py checks the model it loaded

    with pytest.raises(SystemExit, match=rf"^\[prepare_model\] [^\n]*{expected}[^\n]*$"):
        run_stage("prepare_model", prepare_model)
