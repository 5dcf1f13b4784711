"""Stage check_inputs: every check of a later stage that a value in params.yaml can fail, on the base model and
your data files, before any stage that owns outputs runs with that value: DVC deletes a stage's outputs before
running it, so a value refused by the stage itself would cost them. The stages keep their own checks (a direct
call of their script). It writes the list of its checks, not the values, so a change of params reruns only it."""

from nirvana.core.io import write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.evaluation.zeroshot import check_zero_shot
from nirvana.method.allocation import check_reachable
from nirvana.models import get_adapter
from nirvana.models.loading import skeleton
from nirvana.pipeline.checks import (
    check_context,
    check_model_folder,
    check_teacher,
    check_tokenizer,
    check_user_calibration,
    sequence_lengths,
)
from nirvana.recovery.finetune import load_rows

CHECKS = (
    "model folder and tokenizer",
    "sequence lengths within the model's context",
    "calibration.path (your file)",
    "finetune.path (your file)",
    "finetune.teacher",
    "attention.granularity",
    "sparsity reachable under allocation",
    "evaluate.tasks",
)


def main(params: Params, model_dir: str, calibration: str, finetune: str, out: str) -> None:
    """`calibration` and `finetune` are calibration.path and finetune.path (the built-in pool unless yours)."""
    c, f = params.calibration, params.finetune
    config = check_model_folder(model_dir)
    tokenizer = check_tokenizer(model_dir, config)
    check_context(config, model_dir, sequence_lengths(params))
    if c.user_file:
        check_user_calibration(c, calibration, tokenizer, config, model_dir)
    if f.steps and f.user_file:
        load_rows(finetune)
    if f.steps and f.loss != "lm" and f.teacher:  # null: the base model teaches, its own vocabulary
        check_teacher(f.teacher, model_dir)
    model = skeleton(model_dir, params.attention.granularity, params.model)
    get_adapter(model.config)  # refuses query_head units on a model without grouped-query attention
    check_reachable(model, params)
    check_zero_shot(params.evaluate.tasks)
    write_json({"checks": list(CHECKS)}, out)


if __name__ == "__main__":
    run_stage("check_inputs", main)
