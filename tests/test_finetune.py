"""Recovery fine-tuning: merged LoRA equals base plus adapter, the distillation loss against a hand-computed KL,
reloads and resumes of LoRA and full fine-tunes, the frozen teacher, the stage under a two-process `accelerate
launch`, and the pass-through."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from fsdp_worker import student
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import load_stage, random_plan, random_text, save_tokenizer, tiny_llama, tiny_model_dir, tiny_t5
from nirvana.core.errors import InputError
from nirvana.core.io import folder_digest
from nirvana.core.params import FinetuneParams, ParamError, Params, defaults, load_params
from nirvana.method.surgery import prune_model, save_model
from nirvana.models import GRANULARITY_KEY
from nirvana.recovery.finetune import (
    IGNORE,
    RecoveryTrainer,
    add_lora,
    build_examples,
    check_launch_precision,
    check_sharded_saving,
    distillation_loss,
    instruction_example,
    precision,
    rebuild,
    target_modules,
    train,
    training_args,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = defaults(FinetuneParams, steps=6, seq_len=16, batch_size=2, warmup_steps=1, save_steps=2, lr=1e-2)


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


class Interrupt(TrainerCallback):
    """Stops training like a Ctrl-C after a checkpoint has been written."""

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 4:
            raise KeyboardInterrupt


def frozen_teacher(pruned_dir: Path, f: FinetuneParams) -> AutoModelForCausalLM | None:
    """The dense model the pruned one came from, as the stage loads its teacher (None for the lm loss)."""
    if f.loss == "lm":
        return None
    return AutoModelForCausalLM.from_pretrained(pruned_dir.parent / "dense").requires_grad_(False).eval()


RECIPES = [("lora", "lm"), ("full", "kd"), ("lora", "mix")]


@pytest.mark.parametrize("adapter,loss", RECIPES)
def test_interrupted_training_resumes_to_the_same_model(pruned_dir: Path, tmp_path: Path, adapter, loss) -> None:
    f = dataclasses.replace(TINY, adapter=adapter, loss=loss, lr=1e-2 if adapter == "lora" else 1e-3)
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    examples = build_examples(text_rows(), tokenizer, f.seq_len)
    teacher = frozen_teacher(pruned_dir, f)

    def run(folder: str, callbacks: tuple = ()) -> tuple:
        model = AutoModelForCausalLM.from_pretrained(pruned_dir)
        return train(model, tokenizer, examples, f, tmp_path / folder, callbacks, teacher=teacher)

    straight, summary = run("a")
    assert summary["resumed_from_step"] == 0 and summary["steps"] == f.steps
    with pytest.raises(KeyboardInterrupt):
        run("b", (Interrupt(),))
    assert (tmp_path / "b/checkpoint-4").is_dir()
    resumed, summary = run("b")
    assert summary["resumed_from_step"] == 4 and summary["steps_per_process"] == [2]
    dense = AutoModelForCausalLM.from_pretrained(pruned_dir).state_dict()
    for name, weight in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], weight, atol=1e-6, rtol=0)
    assert any(not torch.equal(dense[n], w) for n, w in straight.state_dict().items())


def test_distillation_loss_is_the_kl_at_the_positions_the_next_token_loss_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 1], [IGNORE, 2, 2, IGNORE, IGNORE]])
    temperature = 2.0

    def kl(t: torch.Tensor, s: torch.Tensor) -> float:  # sum_v p log(p / q), by hand
        p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
        return float((p * (p / q).log()).sum())

    # causal: logits at t predict the label at t + 1; seq2seq (decoder): logits at t, label at t
    causal = [kl(teacher[b, t], student[b, t]) for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE]
    seq2seq = [kl(teacher[b, t], student[b, t]) for b in range(2) for t in range(5) if labels[b, t] != IGNORE]
    assert len(causal) == len(seq2seq) == 5  # the same labels, seen from different positions
    for is_causal, kls in ((True, causal), (False, seq2seq)):
        got = distillation_loss(student, teacher, labels, temperature, causal=is_causal).item()
        assert got == pytest.approx(temperature**2 * sum(kls) / len(kls), rel=1e-5)
    assert distillation_loss(teacher, teacher, labels, temperature, causal=True).item() == pytest.approx(0, abs=1e-6)


def test_the_trainer_mixes_distillation_and_next_token_loss(pruned_dir: Path, tmp_path: Path) -> None:
    """RecoveryTrainer's loss on a batch with masked positions: kd_alpha x KL + (1 - kd_alpha) x cross-entropy."""
    f = dataclasses.replace(TINY, loss="mix", kd_alpha=0.3, kd_temperature=2.0)
    student, teacher = AutoModelForCausalLM.from_pretrained(pruned_dir), frozen_teacher(pruned_dir, f)
    trainer = RecoveryTrainer(f=f, teacher=teacher, model=student, args=training_args(f, tmp_path, student.dtype))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt
    labels[1, 7:] = IGNORE  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        logits, taught = student(ids).logits, teacher(ids).logits
    lm = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    kd = distillation_loss(logits, taught, labels, 2.0, causal=True)
    assert kd.item() > 0.01  # the pruned model does not match the dense one
    assert loss.item() == pytest.approx(0.3 * kd.item() + 0.7 * lm.item(), rel=1e-5)


@pytest.mark.parametrize("adapter,loss", RECIPES)
def test_a_trained_model_reloads_with_the_same_logits_and_the_teacher_is_untouched(
    pruned_dir: Path, tmp_path: Path, adapter: str, loss: str
) -> None:
    f = dataclasses.replace(TINY, steps=3, adapter=adapter, loss=loss)
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    teacher = frozen_teacher(pruned_dir, f)
    before = {n: w.clone() for n, w in teacher.state_dict().items()} if teacher else {}
    examples = build_examples(text_rows(), tokenizer, f.seq_len)
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    total = sum(p.numel() for p in model.parameters())
    tuned, summary = train(model, tokenizer, examples, f, tmp_path / "checkpoints", teacher=teacher)
    save_model(tuned, tokenizer, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned.eval()(ids).logits, atol=1e-5, rtol=0)
    assert reloaded.config.nirvana_units == AutoModelForCausalLM.from_pretrained(pruned_dir).config.nirvana_units
    assert (summary["trainable_params"] == total) == (adapter == "full")
    assert summary["loss"] == loss and summary["adapter"] == adapter and summary["tokens_seen"] == 3 * 2 * 16
    if teacher is not None:
        assert all(torch.equal(before[n], w) for n, w in teacher.state_dict().items())
        assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_trains_an_encoder_decoder(tmp_path: Path) -> None:
    """T5: the decoder's logits against the teacher's at every target position (no shift)."""
    save_tokenizer(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    student, teacher = tiny_t5("gated-gelu", seed=0), tiny_t5("gated-gelu", seed=1).requires_grad_(False)
    f = dataclasses.replace(TINY, steps=2, loss="kd", kd_temperature=2.0)
    examples = build_examples(text_rows(), tokenizer, f.seq_len, seq2seq=True)
    start = {n: w.clone() for n, w in student.state_dict().items()}
    tuned, summary = train(student, tokenizer, examples, f, tmp_path / "checkpoints", teacher=teacher)
    assert summary["steps"] == 2 and summary["loss_first"] > 0
    assert any(not torch.equal(start[n], w) for n, w in tuned.state_dict().items())


def run_stage(repo: Path, finetune: dict, launcher: list[str]) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["finetune"] |= finetune
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    paths = ["pruned", "corpus.parquet", "dense", "out/finetuned", "out/finetune.json"]
    return subprocess.run(
        [*launcher, str(ROOT / "stages/finetune.py"), *paths], cwd=repo, capture_output=True, text=True
    )


@pytest.mark.slow  # starts processes
def test_stage_under_two_process_accelerate_launch(pruned_dir: Path) -> None:
    repo = pruned_dir.parent
    text_rows(40).to_parquet(repo / "corpus.parquet")
    # accelerate's --cpu flag needs MPI for several processes; --multi_gpu on a host without
    # GPUs starts torchrun processes that train with DDP on gloo
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    dense = folder_digest(repo / "dense")
    recipe = {"steps": 4, "seq_len": 16, "batch_size": 2, "save_steps": 2, "loss": "mix"}  # each rank its teacher
    done = run_stage(repo, recipe, launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((repo / "out/finetune.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_process"] == [4, 4]
    assert summary["distributed"] == "MULTI_CPU"
    assert summary["loss"] == "mix" and summary["teacher"] == "dense" and summary["teacher_digest"] == dense
    assert folder_digest(repo / "dense") == dense  # the teacher is read, never written
    saved = {p.name for p in (repo / "out/finetuned").iterdir()}
    assert saved == {p.name for p in pruned_dir.iterdir()} | {"README.md"}  # the pruned folder's files and a card
    assert (
        load_file(repo / "out/finetuned/model.safetensors").keys() == load_file(pruned_dir / "model.safetensors").keys()
    )
    assert sorted(p.name for p in (repo / "out").iterdir()) == ["finetune.json", "finetuned"]
    assert not any((repo / "checkpoints/finetune").iterdir())
    tuned = AutoModelForCausalLM.from_pretrained(repo / "out/finetuned")
    before = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert tuned.config.nirvana_units == before.config.nirvana_units
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_zero_steps_pass_the_pruned_model_through(pruned_dir: Path) -> None:
    repo = pruned_dir.parent
    text_rows().to_parquet(repo / "corpus.parquet")
    done = run_stage(repo, {"steps": 0}, [sys.executable])
    assert done.returncode == 0, done.stderr[-3000:]
    for path in pruned_dir.iterdir():
        assert (repo / "out/finetuned" / path.name).read_bytes() == path.read_bytes()
    shutil.rmtree(repo / "out")


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_fsdp_sharded_student_is_gathered_and_merged(tmp_path: Path, adapter: str) -> None:
    """FSDP and ZeRO-3 leave each process a shard of every weight: the saved model is rebuilt from the gathered
    state dict. Two gloo processes shard with FSDP2 and gather as accelerate does (accelerate itself runs FSDP on
    GPUs only); the folder rank 0 saves gives the logits of the unsharded student, tied embeddings included."""
    dense = tmp_path / "dense"
    tiny_llama(tie_word_embeddings=True).save_pretrained(dense)
    save_tokenizer(dense)
    model = AutoModelForCausalLM.from_pretrained(dense)
    prune_model(model, random_plan(model, seed=3))
    save_model(model, AutoTokenizer.from_pretrained(dense), tmp_path / "pruned")
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    worker.append(ROOT / "tests/fsdp_worker.py")
    args = [tmp_path / "pruned", adapter, tmp_path / "out"]
    done = subprocess.run([*map(str, worker), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    unsharded = student(str(tmp_path / "pruned"), adapter)
    expected = unsharded.merge_and_unload() if adapter == "lora" else unsharded
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected.eval()(ids).logits, atol=1e-5, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()(ids).logits
    assert (reloaded(ids).logits - base).abs().max() > 1e-2  # the trained weights, not the pruned ones
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def launched_with(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    """The DeepSpeed variables `accelerate launch` would set, exactly `env` (none from this shell)."""
    for key in ("USE_DEEPSPEED", "DEEPSPEED_CONFIG_FILE", "DEEPSPEED_ZERO_STAGE", "DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"):
        monkeypatch.delenv(f"ACCELERATE_{key}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    "env,config,stops",
    [
        ({}, None, False),  # no DeepSpeed
        (ZERO3, None, True),  # accelerate config with zero_stage 3 and no 16-bit gathering
        (ZERO3 | {"ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}, None, False),
        (ZERO3 | {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None, False),  # ZeRO-2 keeps whole weights
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"stage": 3}, True),  # a DeepSpeed JSON
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}, False),
        (ZERO3 | {"ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}, {"stage": "auto"}, False),
    ],
)
def test_zero3_without_gathering_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, config: dict | None, stops: bool
) -> None:
    launched_with(monkeypatch, env)
    if config is not None:
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": config}))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    if stops:
        with pytest.raises(InputError, match=r"^finetune\.launch: DeepSpeed ZeRO-3 cannot gather"):
            check_sharded_saving()
    else:
        check_sharded_saving()


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_stage_refuses_zero3_without_gathering_before_training(pruned_dir: Path, monkeypatch: pytest.MonkeyPatch):
    repo = pruned_dir.parent
    text_rows().to_parquet(repo / "corpus.parquet")
    launched_with(monkeypatch, ZERO3)
    done = run_stage(repo, {"steps": 4, "seq_len": 16}, [sys.executable])
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("[finetune] finetune.launch: DeepSpeed ZeRO-3")
    assert "Traceback" not in done.stderr
    assert not (repo / "out").exists() and not (repo / "checkpoints").exists()


def test_rebuilt_model_keeps_its_computed_buffers_with_its_weights() -> None:
    """Rotary frequencies are not in a state dict: rebuilt, they must sit where the gathered weights do (a GPU
    when unsharded; the meta device stands in for it here)."""
    model = tiny_llama()
    state = {name: tensor.to("meta") for name, tensor in model.state_dict().items()}
    rebuilt = rebuild(model.config, state, dataclasses.replace(TINY, adapter="full"), model.dtype)
    assert [name for name, _ in rebuilt.named_buffers()]  # there is something to place
    assert {b.device.type for b in rebuilt.buffers()} == {p.device.type for p in rebuilt.parameters()} == {"meta"}


NO_AMP = {"use_cpu": False, "bf16": False, "fp16": False}


@pytest.mark.parametrize(
    "dtype,device,flags",
    [
        (torch.float32, "cuda", NO_AMP),  # float32 trains in float32, even where the GPU has bf16
        (torch.bfloat16, "cuda", NO_AMP | {"bf16": True}),
        (torch.float16, "cuda", NO_AMP | {"fp16": True}),  # autocast with loss scaling
        (torch.float32, "cpu", NO_AMP | {"use_cpu": True}),
        (torch.bfloat16, "cpu", NO_AMP | {"use_cpu": True, "bf16": True}),
    ],
)
def test_training_precision_follows_model_dtype(dtype: torch.dtype, device: str, flags: dict) -> None:
    assert precision(dtype, device) == flags


def test_float16_on_the_cpu_is_refused_and_the_trainer_takes_the_flags(tmp_path: Path) -> None:
    """accelerate scales the loss only on a GPU: fp16 gradients on the CPU would underflow unscaled."""
    with pytest.raises(InputError, match=r"^params: model\.dtype = 'float16' cannot fine-tune on the CPU"):
        precision(torch.float16, "cpu")
    bf16, fp32 = training_args(TINY, tmp_path, torch.bfloat16), training_args(TINY, tmp_path, torch.float32)
    assert (bf16.bf16, bf16.fp16, bf16.use_cpu) == (True, False, True)
    assert (fp32.bf16, fp32.fp16, fp32.mixed_precision) == (False, False, "no")


def test_lora_over_float16_weights_trains_float32_adapters() -> None:
    """What makes fp16 with loss scaling sound: the gradients the scaler unscales are those of float32 adapters."""
    model = add_lora(tiny_llama(dtype=torch.float16), TINY)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.float16}


def yaml_params(tmp_path: Path, dtype: str, finetune: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["dtype"] = dtype
    raw["finetune"] |= finetune
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


def test_a_float16_full_fine_tune_is_refused_with_the_params(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match=r"^params: finetune\.adapter = 'full' is invalid; .*model\.dtype = 'float16'"):
        load_params(yaml_params(tmp_path, "float16", {"adapter": "full"}))
    assert load_params(yaml_params(tmp_path, "float16", {"adapter": "lora"})).finetune.adapter == "lora"
    assert load_params(yaml_params(tmp_path, "bfloat16", {"adapter": "full"})).model.dtype == "bfloat16"
    assert load_params(yaml_params(tmp_path, "float16", {"adapter": "full", "steps": 0})).finetune.steps == 0


def test_lora_adapts_every_projection_at_query_head_granularity() -> None:
    """query_head units own q and o slices only; the adapters still go on k_proj and v_proj."""
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    setattr(model.config, GRANULARITY_KEY, "query_head")
    prune_model(model, random_plan(model, seed=0, drop=0.9))
    attention = [layer.self_attn for layer in model.model.layers]
    assert any(a.q_proj.out_features < 16 for a in attention) and all(a.k_proj.out_features == 8 for a in attention)
    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert target_modules(model) == expected
    adapted = {name.rsplit(".", 1)[-1] for name, m in add_lora(model, TINY).named_modules() if hasattr(m, "lora_A")}
    assert sorted(adapted) == expected


OUTS = ("out/finetuned", "out/finetune.json")


def test_a_fine_tune_resumes_only_a_checkpoint_of_the_same_code(pruned_dir: Path, monkeypatch: pytest.MonkeyPatch):
    repo, stage = pruned_dir.parent, load_stage("finetune")
    text_rows(40).to_parquet(repo / "corpus.parquet")
    params = defaults(Params, finetune=dataclasses.replace(TINY, steps=4))
    monkeypatch.chdir(repo)

    def run(code: str) -> int:
        monkeypatch.setattr(stage, "code_digest", lambda script: code)
        stage.main(params, "pruned", "corpus.parquet", "dense", *OUTS)
        return json.loads((repo / OUTS[1]).read_text())["resumed_from_step"]

    with monkeypatch.context() as patch:  # the checkpoint of step 2 stays, as after a kill
        patch.setattr(stage, "remove_checkpoints", lambda folder: None)
        assert run("old") == 0
    assert run("new") == 0  # not the old code's checkpoint
    assert run("old") == 2  # which the old code resumes


def test_unknown_columns_are_refused(pruned_dir: Path) -> None:
    with pytest.raises(InputError, match=r"^mine\.jsonl: needs columns instruction and output .*; has prompt$"):
        build_examples(
            pd.DataFrame({"prompt": ["w1"]}), AutoTokenizer.from_pretrained(pruned_dir), 16, False, "mine.jsonl"
        )


def test_data_without_an_example_stops_the_stage_in_one_line_before_the_model_loads(
    pruned_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prompt longer than finetune.seq_len leaves no answer token to learn."""
    repo, stage = pruned_dir.parent, load_stage("finetune")
    prompt = " ".join(["w1"] * 40)
    pd.DataFrame({"instruction": [prompt, prompt], "output": ["w2", "w3"]}).to_parquet(repo / "long.parquet")
    monkeypatch.chdir(repo)
    monkeypatch.setattr(stage, "load_model", None)  # never reached
    with pytest.raises(InputError) as err:
        stage.main(defaults(Params, finetune=TINY), "pruned", "long.parquet", "dense", *OUTS)
    message = str(err.value)
    assert message.startswith("long.parquet: no example with a token to learn") and "\n" not in message
    assert "finetune.seq_len = 16" in message
    assert not (repo / "out").exists() and not (repo / "checkpoints").exists()


@pytest.mark.parametrize("loss,teacher", [("kd", False), ("lm", True)])
def test_a_loss_without_its_teacher_is_a_param_error(pruned_dir: Path, tmp_path: Path, loss: str, teacher: bool):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(pruned_dir), AutoTokenizer.from_pretrained(pruned_dir)
    examples, f = build_examples(text_rows(), tokenizer, 16), dataclasses.replace(TINY, loss=loss)
    with pytest.raises(ParamError, match=rf"^params: finetune\.loss = '{loss}' "):
        train(model, tokenizer, examples, f, tmp_path, teacher=model if teacher else None)
    assert not (tmp_path / "checkpoint-2").exists()


@pytest.mark.parametrize(
    "dtype,launched,stops",
    [
        (torch.float32, None, False),  # plain python
        (torch.float32, "no", False),
        (torch.float32, "bf16", True),  # Trainer would autocast the float32 weights to bf16
        (torch.bfloat16, "bf16", False),
        (torch.float16, "fp16", False),
        (torch.bfloat16, "fp16", True),
    ],
)
def test_a_launcher_precision_other_than_model_dtype_is_refused(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, launched: str | None, stops: bool
) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launched is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    if stops:
        with pytest.raises(InputError, match=rf"^finetune\.launch: accelerate's mixed_precision is {launched}, but "):
            check_launch_precision(dtype)
    else:
        check_launch_precision(dtype)
