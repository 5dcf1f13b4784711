"""Stage finetune: recover quality with LoRA (method §4, adapters merged) or every weight, on the next-token
loss or distilled from the dense model (finetune.teacher), and save a pruned-model folder with its model card.
Runs unchanged under `accelerate launch` (params: finetune.launch); steps 0 copies the pruned folder and writes a
fresh card for the copy (same weights, steps 0)."""

import shutil
from functools import partial
from pathlib import Path

import torch

from nirvana.core.io import atomic_path, code_digest, folder_digest, log, sha256_file, write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.deploy.card import CARD, finetune_record, model_card
from nirvana.method.forward import is_seq2seq
from nirvana.method.surgery import save_model
from nirvana.models.loading import device, load_model, load_tokenizer, skeleton
from nirvana.pipeline.checks import check_finetune, check_teacher
from nirvana.recovery.finetune import (
    build_examples,
    check_launch_precision,
    check_sharded_saving,
    checkpoint_key,
    is_main_process,
    load_rows,
    load_teacher,
    precision,
    remove_checkpoints,
    train,
    wait_for_everyone,
)

CHECKPOINTS = Path("checkpoints/finetune")  # outside every DVC output; removed on success


def main(params: Params, model_dir: str, data: str, dense_dir: str, out_dir: str, metrics_out: str) -> None:
    """`data` is finetune.path: the built-in corpus or a user's file (ignored for finetune.source); `dense_dir`
    the dense model, the teacher when finetune.teacher is null."""
    f = params.finetune
    check_finetune(f, model_dir)
    if f.steps:
        check_sharded_saving()
        dtype = getattr(torch, params.model.dtype)
        precision(dtype, device().type)  # float16 on a CPU stops here
        check_launch_precision(dtype)
    teacher_dir = (f.teacher or dense_dir) if f.loss != "lm" else None
    if teacher_dir and f.steps:
        check_teacher(teacher_dir, model_dir)
    if f.steps == 0:
        if is_main_process():
            record = finetune_record(model_dir, f, {"steps": 0}, None)
            with atomic_path(out_dir) as tmp:
                shutil.copytree(model_dir, tmp)
                (tmp / CARD).write_text(model_card(record, tmp))
            digests = {"base_digest": folder_digest(model_dir), "model_digest": folder_digest(out_dir)}
            write_json({"steps": 0, **digests}, metrics_out)
            log.info("finetune.steps is 0: %s is a copy of %s", out_dir, model_dir)
        return
    rows = load_rows(data, f.source)  # a bad file fails here, before the model is loaded
    tokenizer, seq2seq = load_tokenizer(model_dir, params.model), is_seq2seq(skeleton(model_dir, m=params.model))
    examples = build_examples(rows, tokenizer, f.seq_len, seq2seq, f.source or data)  # before the model loads too
    model = load_model(model_dir, params.model, on="cpu")
    base = folder_digest(model_dir)
    teacher = load_teacher(teacher_dir, params.model) if teacher_dir else None
    taught = {"teacher": teacher_dir, "teacher_digest": folder_digest(teacher_dir)} if teacher_dir else {}
    checkpoints = CHECKPOINTS / checkpoint_key(base, code_digest(__file__), f, data, taught.get("teacher_digest", ""))
    merged, summary = train(model, tokenizer, examples, f, checkpoints, teacher=teacher)
    summary |= taught
    if merged is not None:  # rank 0: the one process that holds the gathered model
        provenance = {
            "base_digest": base,
            "data": f.source or data,
            "data_sha256": "" if f.source else sha256_file(data),
        }
        card = partial(model_card, finetune_record(model_dir, f, summary | provenance, merged))
        save_model(merged, load_tokenizer(model_dir, params.model), out_dir, card=card)
        write_json(summary | {"base_digest": base, "model_digest": folder_digest(out_dir)}, metrics_out)
        remove_checkpoints(checkpoints)
        log.info("wrote %s: %s", out_dir, ", ".join(f"{k} {v}" for k, v in summary.items()))
    wait_for_everyone()


if __name__ == "__main__":
    run_stage("finetune", main)
