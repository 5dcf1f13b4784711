"""Stage select_calibration: the candidate calibration set whose pruned model has the lowest
KL divergence from the dense model on a held-out KL set (method §3)."""

import pandas as pd

from nirvana.calibration import candidate_pool, select, summary
from nirvana.checks import check_calibration
from nirvana.data import read_texts
from nirvana.io import log, write_json, write_parquet
from nirvana.modeling import load_model, load_tokenizer
from nirvana.params import Params
from nirvana.stage import run_stage


def main(params: Params, model_dir: str, pool_path: str, out: str, table_out: str, metrics_out: str) -> None:
    c = params.calibration
    check_calibration(c, model_dir)
    pool, kl_windows = candidate_pool(c, load_tokenizer(model_dir), read_texts(pool_path))
    model = load_model(model_dir, params.model, granularity=params.attention.granularity) if c.candidates > 1 else None
    selected, table = select(model, pool, kl_windows, params, verbatim=c.path is not None)
    write_parquet(pd.DataFrame({"input_ids": selected.tolist()}), out)
    write_parquet(table, table_out)
    write_json(summary(table), metrics_out)
    winner = table.loc[table.selected].iloc[0]
    log.info(
        "wrote %s: candidate %d of %d (%d windows x %d tokens), KL %.5f",
        out,
        winner.candidate,
        len(table),
        *selected.shape,
        winner.kl,
    )


if __name__ == "__main__":
    run_stage("select_calibration", main)
