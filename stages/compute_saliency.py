"""Stage compute_saliency: one score per attention unit and MLP channel with each criterion of `method`
(NIRVANA's of method §1 or a baseline's; several when the plan selection chooses among them)."""

import pandas as pd

from nirvana.checks import check_model, check_windows
from nirvana.criteria import CRITERIA
from nirvana.data import read_windows
from nirvana.io import log, write_parquet
from nirvana.modeling import load_model
from nirvana.params import Params
from nirvana.saliency import enable_checkpointing
from nirvana.stage import run_stage


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
