"""Stage compute_saliency: one score per attention unit and MLP channel with each criterion of `method`
(NIRVANA's of method §1 or a baseline's; several when the plan selection chooses among them)."""

import pandas as pd

from nirvana.core.data import read_windows
from nirvana.core.io import log, write_parquet
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.method.criteria import CRITERIA
from nirvana.method.saliency import enable_checkpointing
from nirvana.models.loading import load_model
from nirvana.pipeline.checks import check_model, check_windows


def main(params: Params, model_dir: str, calibration: str, out: str) -> None:
    check_windows(calibration, check_model(model_dir, tokenizer=False))
    windows = read_windows(calibration)
    model = load_model(model_dir, params.model, granularity=params.attention.granularity)
    if params.saliency.gradient_checkpointing:
        enable_checkpointing(model)
    tables = [CRITERIA[m](model, windows, params.saliency.batch_size).assign(method=m) for m in params.methods]
    scores = pd.concat(tables, ignore_index=True)
    write_parquet(scores, out)
    log.info("wrote %s: %d units scored with %s", out, len(tables[0]), ", ".join(params.methods))


if __name__ == "__main__":
    run_stage("compute_saliency", main)
