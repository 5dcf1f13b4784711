"""Recovery fine-tuning: merged LoRA equals base plus adapter, resume after an interruption, the
stage under a two-process `accelerate launch`, and the pass-through."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import random_plan, random_text, tiny_llama, tiny_model_dir
from nirvana.finetune import IGNORE, add_lora, build_examples, instruction_example, target_modules, train
from nirvana.params import FinetuneParams
from nirvana.surgery import prune_model, save_model

ROOT = Path(__file__).resolve().parents[1]
TINY = FinetuneParams(steps=6, seq_len=16, batch_size=2, warmup_steps=1, save_steps=2, lr=1e-2)


@pytest.fixture
def pruned_dir(tmp_path: Path) -> Path:
    """A saved tiny model with uneven per-layer widths, as the prune stage writes it."""
    tiny_model_dir(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    prune_model(model, random_plan(model, seed=3))
    save_model(model, AutoTokenizer.from_pretrained(tmp_path / "dense"), tmp_path / "pruned")
    return tmp_path / "pruned"


def text_rows(count: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"text": [random_text(40, seed) for seed in range(count)]})


def test_lora_targets_every_prunable_projection() -> None:
    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert target_modules(tiny_llama()) == expected


def test_merged_model_equals_base_plus_adapter_and_reloads(pruned_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    peft_model = add_lora(model, TINY).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # LoRA starts as a no-op (B = 0); make it a real change
        adapted = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    save_model(merged, AutoTokenizer.from_pretrained(pruned_dir), tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(logits, adapted, atol=1e-4, rtol=0)
    assert reloaded.config.nirvana_units == model.config.nirvana_units


def test_instruction_prompt_is_masked_out_of_the_loss(pruned_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    row = {"instruction": "w1 w2 w3", "input": "w4 w5", "output": "w6 w7"}
    example = instruction_example(row, tokenizer, seq_len=64)
    answer = [tokenizer.convert_tokens_to_ids(w) for w in ("w6", "w7")] + [tokenizer.eos_token_id]
    learned = [label for label in example["labels"] if label != IGNORE]
    assert learned == answer and example["input_ids"][-3:] == answer
    assert len(example["labels"]) == len(example["input_ids"])
    assert example["labels"][: -len(answer)] == [IGNORE] * (len(example["input_ids"]) - len(answer))


def test_unknown_columns_are_refused(pruned_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"instruction\+output or text.*prompt"):
        build_examples(pd.DataFrame({"prompt": ["w1"]}), AutoTokenizer.from_pretrained(pruned_dir), 16)


class Interrupt(TrainerCallback):
    """Stops training like a Ctrl-C after a checkpoint has been written."""

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 4:
            raise KeyboardInterrupt


def test_interrupted_training_resumes_to_the_same_model(pruned_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    examples = build_examples(text_rows(), tokenizer, TINY.seq_len)
    straight, summary = train(
        AutoModelForCausalLM.from_pretrained(pruned_dir), tokenizer, examples, TINY, tmp_path / "a"
    )
    assert summary["resumed_from_step"] == 0 and summary["steps"] == TINY.steps
    with pytest.raises(KeyboardInterrupt):
        train(
            AutoModelForCausalLM.from_pretrained(pruned_dir), tokenizer, examples, TINY, tmp_path / "b", [Interrupt()]
        )
    assert (tmp_path / "b/checkpoint-4").is_dir()
    resumed, summary = train(
        AutoModelForCausalLM.from_pretrained(pruned_dir), tokenizer, examples, TINY, tmp_path / "b"
    )
    assert summary["resumed_from_step"] == 4 and summary["steps_per_process"] == [2]
    dense = AutoModelForCausalLM.from_pretrained(pruned_dir).state_dict()
    for name, weight in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], weight, atol=1e-6, rtol=0)
    assert any(not torch.equal(dense[n], w) for n, w in straight.state_dict().items())


def run_stage(repo: Path, finetune: dict, launcher: list[str]) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["finetune"] |= finetune
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    paths = ["pruned", "corpus.parquet", "out/finetuned", "out/finetune.json"]
    return subprocess.run(
        [*launcher, str(ROOT / "stages/finetune.py"), *paths], cwd=repo, capture_output=True, text=True
    )


def test_stage_under_two_process_accelerate_launch(pruned_dir: Path) -> None:
    repo = pruned_dir.parent
    text_rows(40).to_parquet(repo / "corpus.parquet")
    # accelerate's --cpu flag needs MPI for several processes; --multi_gpu on a host without
    # GPUs starts torchrun processes that train with DDP on gloo
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = run_stage(repo, {"steps": 4, "seq_len": 16, "batch_size": 2, "save_steps": 2}, launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((repo / "out/finetune.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_process"] == [4, 4]
    assert summary["distributed"] == "MULTI_CPU"
    assert sorted(p.name for p in (repo / "out").iterdir()) == ["finetune.json", "finetuned"]
    assert not any((repo / "checkpoints/finetune").iterdir())
    tuned = AutoModelForCausalLM.from_pretrained(repo / "out/finetuned")
    before = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert tuned.config.nirvana_units == before.config.nirvana_units
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)


def test_zero_steps_pass_the_pruned_model_through(pruned_dir: Path) -> None:
    repo = pruned_dir.parent
    text_rows().to_parquet(repo / "corpus.parquet")
    done = run_stage(repo, {"steps": 0}, [sys.executable])
    assert done.returncode == 0, done.stderr[-3000:]
    for path in pruned_dir.iterdir():
        assert (repo / "out/finetuned" / path.name).read_bytes() == path.read_bytes()
    shutil.rmtree(repo / "out")
