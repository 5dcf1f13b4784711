"""Stage publish: the folder a user would upload (the fine-tuned model, its weights unchanged) with a
model card that adds the measured results as Hub evaluation results. A stage of its own because the
results exist only after evaluate, and no stage rewrites another stage's output."""

import json
import shutil
from pathlib import Path

from nirvana.core.errors import InputError
from nirvana.core.io import atomic_path, folder_digest, log
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.deploy.card import CARD, release_card
from nirvana.pipeline.checks import check_model_folder


def main(params: Params, model_dir: str, dense: str, pruned: str, finetuned: str, zero_shot: str, out_dir: str) -> None:
    check_model_folder(model_dir)
    paths = {"dense": dense, "pruned": pruned, "finetuned": finetuned}
    results = {name: json.loads(Path(path).read_text()) for name, path in paths.items()}
    if results["finetuned"].get("model_digest") != folder_digest(model_dir):
        raise InputError(f"{finetuned} was measured on another model than {model_dir}; rerun evaluate")
    with atomic_path(out_dir) as tmp:
        shutil.copytree(model_dir, tmp)
        (tmp / CARD).write_text(release_card(model_dir, results, json.loads(Path(zero_shot).read_text())))
    log.info("wrote %s: %s with its results in the model card", out_dir, model_dir)


if __name__ == "__main__":
    run_stage("publish", main)
