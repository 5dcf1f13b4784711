"""Stage select_calibration: the candidate calibration set whose pruned model has the lowest
KL divergence from the dense model on a held-out KL set (method §3)."""

import pandas as pd

from nirvana.calibration import select, summary
from nirvana.data import dataset_texts, hold_out, token_stream, user_windows, windows
from nirvana.io import log, write_json, write_parquet
from nirvana.modeling import load_model, load_tokenizer
from nirvana.params import Params
from nirvana.stage import run_stage


def main(params: Params, model_dir: str, pool_path: str, out: str, table_out: str, metrics_out: str) -> None:
    c = params.calibration
    tokenizer = load_tokenizer(model_dir)
    stream, kl_windows = hold_out(token_stream(pd.read_parquet(pool_path)["text"].tolist(), tokenizer),
                                  c.kl_samples, c.kl_seq_len)
    if c.path:
        pool = user_windows(c.path, tokenizer, c.seq_len)
    else:
        pool = windows(token_stream(dataset_texts(c.source), tokenizer) if c.source else stream, c.seq_len)
    model = load_model(model_dir) if c.candidates > 1 else None
    selected, table = select(model, pool, kl_windows, params, verbatim=c.path is not None)
    write_parquet(pd.DataFrame({"input_ids": selected.tolist()}), out)
    write_parquet(table, table_out)
    write_json(summary(table), metrics_out)
    log.info("wrote %s: candidate %d of %d (%d windows x %d tokens), KL %s", out,
             table.loc[table.selected, "candidate"].iloc[0], len(table), *selected.shape,
             table.loc[table.selected, "kl"].iloc[0])


if __name__ == "__main__":
    run_stage("select_calibration", main)
