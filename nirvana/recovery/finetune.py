"""Recovery fine-tuning: LoRA with peft on every prunable projection (method §4) or every weight, on the
next-token loss or distilled from the dense model (forward KL, as Minitron recovers), trained by
transformers' Trainer, so `accelerate launch` runs the same code on DDP, FSDP or DeepSpeed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import datasets
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import PartialState, init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from nirvana.core.data import bos_id, token_stream, windows
from nirvana.core.errors import InputError
from nirvana.core.params import FinetuneParams, ModelParams, ParamError
from nirvana.method.forward import IGNORE, is_seq2seq, split
from nirvana.models import get_adapter
from nirvana.models.loading import auto_class, device, load_model

PROMPT = "### Instruction:\n{instruction}\n\n{context}### Response:\n"


def target_modules(model: PreTrainedModel) -> list[str]:
    """Names of the Linear layers of the prunable layers: all seven projections on Llama, whatever the attention
    granularity (query_head units leave k_proj and v_proj whole, yet pruning shifted their inputs too)."""
    modules = [named for layer in get_adapter(model.config).layers(model) for named in layer.named_modules()]
    return sorted({name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, torch.nn.Linear)})


def add_lora(model: PreTrainedModel, f: FinetuneParams) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only they train."""
    config = LoraConfig(
        r=f.lora_r,
        lora_alpha=f.lora_alpha,
        lora_dropout=f.lora_dropout,
        target_modules=target_modules(model),
        task_type="SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    assert isinstance(peft_model, PeftModel)
    return peft_model


def trainable(model: PreTrainedModel, f: FinetuneParams) -> PreTrainedModel | PeftModel:
    """The model that trains: wrapped in fresh LoRA adapters, or itself with every weight trainable (`full`)."""
    if f.adapter == "lora":
        return add_lora(model, f)
    return model.requires_grad_(True)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, causal: bool
) -> torch.Tensor:
    """Forward KL(teacher || student) of the next-token distributions at temperature T, scaled by T^2, averaged
    over the positions the next-token loss counts (a causal model's logits at t predict labels at t + 1)."""
    if causal:
        student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    counted = labels != IGNORE
    log_student = F.log_softmax(student[counted].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[counted].float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


class RecoveryTrainer(Trainer):
    """Trainer whose loss is `finetune.loss`: next-token (the model's own), distillation from a frozen teacher
    that runs on the same batch, or `kd_alpha` x kd + (1 - kd_alpha) x lm."""

    def __init__(self, *args, f: FinetuneParams, teacher: PreTrainedModel | None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.f, self.teacher = f, teacher
        if teacher is not None:  # both terms per-batch means, which Trainer divides for gradient accumulation
            self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        lm, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.teacher is None:
            return (lm, outputs) if return_outputs else lm
        with torch.no_grad():
            taught = self.teacher.to(outputs.logits.device)(**inputs).logits
        causal = not is_seq2seq(self.teacher)
        kd = distillation_loss(outputs.logits, taught, inputs["labels"], self.f.kd_temperature, causal)
        alpha = 1.0 if self.f.loss == "kd" else self.f.kd_alpha
        loss = alpha * kd + (1 - alpha) * lm
        return (loss, outputs) if return_outputs else loss


def load_teacher(path: str | Path, m: ModelParams) -> PreTrainedModel:
    """The frozen teacher: eval mode, no gradients, the stage's dtype; moved to the student's device on first use."""
    return load_model(path, m, on="cpu").requires_grad_(False).eval()


def read_rows(path: str, source: str | None = None) -> pd.DataFrame:
    """The fine-tuning table: a local parquet/JSONL (the built-in corpus by default) or, with
    `source`, a Hugging Face dataset's train split."""
    if source:
        return datasets.load_dataset(source, split="train").to_pandas()
    if path.endswith(".jsonl"):
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def check_rows(rows: pd.DataFrame, name: str) -> None:
    """Fine-tuning rows `build_examples` can use: instruction+output (input optional) or text."""
    columns = set(rows.columns)
    if not ({"instruction", "output"} <= columns or "text" in columns):
        found = ", ".join(map(str, rows.columns)) or "none"
        raise InputError(f"{name}: needs columns instruction and output (input optional), or text; has {found}")
    if rows.empty:
        raise InputError(f"{name}: no rows")


def load_rows(path: str, source: str | None = None) -> pd.DataFrame:
    """`read_rows`, with an unreadable or unusable file reported in one line naming it."""
    name = source or path
    try:
        rows = read_rows(path, source)
    except (OSError, ValueError) as err:  # pyarrow's and pandas' parse errors are ValueErrors
        raise InputError(
            f"{name}: not readable as {'JSON lines' if path.endswith('.jsonl') else 'parquet'} ({err})"
        ) from err
    check_rows(rows, name)
    return rows


def instruction_example(
    row: dict, tokenizer: PreTrainedTokenizerBase, seq_len: int, seq2seq: bool = False
) -> dict[str, list[int]]:
    """Alpaca fields as one sequence whose prompt tokens are masked out of the loss; for an
    encoder-decoder model the prompt is the encoder input and the answer the decoder's target."""
    context = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
    prompt = tokenizer(PROMPT.format(instruction=row["instruction"], context=context))["input_ids"]
    answer = tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if seq2seq:
        return {"input_ids": prompt[:seq_len], "labels": answer[:seq_len]}
    ids = (prompt + answer)[:seq_len]
    labels = ([IGNORE] * len(prompt) + answer)[:seq_len]
    return {"input_ids": ids, "labels": labels}


def build_examples(
    rows: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    seq2seq: bool = False,
    name: str = "finetune.path",
) -> datasets.Dataset:
    """Instruction rows (instruction, input, output) or plain text (a `text` column, causal LM loss
    on windows of `seq_len` tokens, or for an encoder-decoder model the prefix-LM split of `nirvana.method.forward`).
    Unusable rows are an InputError naming `name`, the file they came from."""
    check_rows(rows, name)
    if {"instruction", "output"} <= set(rows.columns):
        examples = [instruction_example(r, tokenizer, seq_len, seq2seq) for r in rows.to_dict("records")]
        examples = [e for e in examples if any(label != IGNORE for label in e["labels"])]
    else:
        ids = windows(token_stream(rows["text"].dropna().tolist(), tokenizer), seq_len, bos_id(tokenizer))
        source, target = split(ids) if seq2seq else (ids, ids)
        examples = [{"input_ids": s, "labels": t} for s, t in zip(source.tolist(), target.tolist(), strict=True)]
    if not examples:
        raise InputError(
            f"{name}: no example with a token to learn from in finetune.seq_len = {seq_len} tokens (a prompt "
            "that long leaves no answer, a text that short fills no window)"
        )
    return datasets.Dataset.from_list(examples)


def check_sharded_saving() -> None:
    """Under DeepSpeed ZeRO-3 (as `accelerate launch` set it up) the trained weights can be gathered to save only
    with 16-bit gathering on: without it the stage would fail after the training, so it stops before."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    zero = json.loads(Path(path).read_text()).get("zero_optimization", {}) if path else {}
    stage, gather = zero.get("stage", "auto"), zero.get("stage3_gather_16bit_weights_on_model_save", "auto")
    if stage == "auto":  # accelerate fills "auto" from its own config, which it passes in these variables
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if gather == "auto":
        gather = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true"
    if int(stage) == 3 and not gather:
        raise InputError(
            "finetune.launch: DeepSpeed ZeRO-3 cannot gather the trained weights to save them; set "
            "zero3_save_16bit_model: true in the accelerate config (stage3_gather_16bit_weights_on_model_save "
            "in a DeepSpeed JSON)"
        )


def checkpoint_key(
    model_digest: str, code: str, f: FinetuneParams, data: str | Path | None, teacher_digest: str = ""
) -> str:
    """Hash of everything a run's result depends on, its code (`nirvana.core.io.code_digest`) included, so a
    checkpoint resumes only the same run."""
    digest = hashlib.sha256(json.dumps(f.__dict__, sort_keys=True, default=str).encode() + model_digest.encode())
    digest.update(code.encode() + teacher_digest.encode())
    if data and Path(data).is_file():
        with Path(data).open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


class NoFinalCheckpoint(TrainerCallback):
    """No checkpoint at the last step: resuming from one would train a step past max_steps, and the
    merged model is saved right after anyway."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that Trainer finished writing (trainer_state.json is its last file): a kill
    during a save leaves a folder without it, which would fail every rerun."""
    done = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if step.isdigit():
            done.append((int(step), path))
    return str(max(done)[1]) if done else None


class StepCounter(TrainerCallback):
    """Counts the optimiser steps this process took (each DDP rank has its own)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.steps += 1


class Precision(TypedDict):
    """TrainingArguments' device and mixed-precision flags."""

    use_cpu: bool
    bf16: bool
    fp16: bool


def precision(dtype: torch.dtype, on: str) -> Precision:
    """TrainingArguments' device and mixed-precision flags for weights in `dtype` (model.dtype) on device type `on`:
    autocast to that dtype (none for float32); fp16 with loss scaling, which accelerate does only on a GPU."""
    if dtype == torch.float16 and on == "cpu":
        raise InputError(
            "params: model.dtype = 'float16' cannot fine-tune on the CPU: fp16 gradients need loss scaling, which "
            "runs on a GPU only; use bfloat16 or float32 here (or finetune.steps: 0)"
        )
    return Precision(use_cpu=on == "cpu", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def check_launch_precision(dtype: torch.dtype) -> None:
    """`accelerate launch` passes its mixed precision on to Trainer, which autocasts float32 weights to it:
    it must be that of model.dtype, or the precision would not follow model.dtype."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    if launched != wanted:
        raise InputError(
            f"finetune.launch: accelerate's mixed_precision is {launched}, but model.dtype = "
            f"{str(dtype).removeprefix('torch.')!r} trains in {wanted}: set mixed_precision: {wanted} in the "
            f"accelerate config (or --mixed_precision {wanted})"
        )


def training_args(f: FinetuneParams, checkpoints: Path, dtype: torch.dtype) -> TrainingArguments:
    """Method §4 defaults, at the precision of `dtype`, the weights' (`precision`)."""
    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=f.steps,
        per_device_train_batch_size=f.batch_size,
        gradient_accumulation_steps=f.grad_accum,
        learning_rate=f.lr,
        warmup_steps=f.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_steps=max(1, f.steps // 20),
        save_strategy="steps",
        save_steps=f.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=f.seed,
        data_seed=f.seed,
        **precision(dtype, device().type),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: datasets.Dataset,
    f: FinetuneParams,
    checkpoints: Path,
    callbacks: Sequence[TrainerCallback] = (),
    teacher: PreTrainedModel | None = None,
) -> tuple[PreTrainedModel | None, dict]:
    """Train (resuming from the newest checkpoint in `checkpoints` if any) and return the model, LoRA
    adapters merged, with a summary. Every process returns the summary; only rank 0 the model, to save."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (teacher is None) != (f.loss == "lm"):
        raise ParamError(f"params: finetune.loss = {f.loss!r} needs a teacher model exactly when it is not 'lm'")
    set_seed(f.seed)  # LoRA's initial A matrices are random
    config, dtype = model.config, model.dtype
    student = trainable(model, f)
    counter = StepCounter()
    trainer = RecoveryTrainer(
        f=f,
        teacher=teacher,
        model=student,
        args=training_args(f, checkpoints, dtype),
        train_dataset=examples,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
        callbacks=[counter, NoFinalCheckpoint(), *callbacks],
    )
    resume = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    result = trainer.train(resume_from_checkpoint=resume)
    steps = trainer.accelerator.gather(torch.tensor([counter.steps])).tolist()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "steps": trainer.state.global_step,
        "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
        "world_size": trainer.accelerator.num_processes,
        "distributed": trainer.accelerator.distributed_type.value,
        "steps_per_process": steps,
        "examples": len(examples),
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "loss": f.loss,
        "adapter": f.adapter,
        **({"kd_temperature": f.kd_temperature} if f.loss != "lm" else {}),
        **({"kd_alpha": f.kd_alpha} if f.loss == "mix" else {}),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
        # one logged loss is one batch's, whose noise (0.18 on SmolLM2) hides a 40-step trend: quarters average
        **quarter_means(losses),
        "train_loss": round(result.training_loss, 4),
    }
    # FSDP and ZeRO-3 leave each process a shard of every weight: gather them (a step every process takes)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not is_main_process():
        return None, summary
    return rebuild(config, state, f, dtype), summary


def rebuild(
    config: PretrainedConfig, state: dict[str, torch.Tensor], f: FinetuneParams, dtype: torch.dtype
) -> PreTrainedModel:
    """The trained model in `dtype` from its full state dict (the student's names, LoRA's included), adapters merged:
    the architecture is built without weights and takes the gathered tensors as they are (no copy when unsharded)."""
    with init_empty_weights(include_buffers=False):  # buffers such as rotary frequencies are computed, not saved
        shell = trainable(auto_class(config).from_config(config), f)
    shell.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device  # the computed buffers join the weights (on the GPU when unsharded)
    shell.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # transformers types .to() oddly
    base = shell.get_base_model() if isinstance(shell, PeftModel) else shell
    assert isinstance(base, PreTrainedModel)
    base.tie_weights()  # assigned tensors are separate, tied ones too; peft's merge would then untie them for good
    merged = shell.merge_and_unload() if isinstance(shell, PeftModel) else shell
    assert isinstance(merged, PreTrainedModel)
    return merged.eval()


def quarter_means(losses: list[float]) -> dict[str, float | None]:
    """Mean logged loss over the first and the last quarter of the logs (at least one log each)."""
    if not losses:
        return {"loss_first_quarter": None, "loss_last_quarter": None}
    n = max(1, len(losses) // 4)
    return {"loss_first_quarter": round(sum(losses[:n]) / n, 4), "loss_last_quarter": round(sum(losses[-n:]) / n, 4)}


def is_main_process() -> bool:
    """True on rank 0, and in a plain single-process run."""
    return PartialState().is_main_process


def wait_for_everyone() -> None:
    """Barrier: no rank leaves before rank 0 has written the outputs."""
    PartialState().wait_for_everyone()


def remove_checkpoints(checkpoints: Path) -> None:
    """Drop a finished run's checkpoints (they only serve to resume an interrupted one)."""
    shutil.rmtree(checkpoints, ignore_errors=True)
