"""Stage select_calibration: the candidate calibration set whose pruned model has the lowest
KL divergence from the dense model on a held-out KL set (method §3). Each finished candidate is kept
under checkpoints/ until the stage succeeds, so an interrupted search resumes where it stopped."""

import shutil
from pathlib import Path

import pandas as pd

from nirvana.core.data import read_texts
from nirvana.core.io import code_digest, folder_digest, log, sha256_file, write_json, write_parquet
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.method.allocation import check_reachable
from nirvana.method.calibration import calibration_metrics, candidate_pool, resume_key, select_windows
from nirvana.models.loading import load_model, load_tokenizer, skeleton
from nirvana.pipeline.checks import check_calibration

CHECKPOINTS = Path("checkpoints/select_calibration")  # outside every DVC output; removed on success


def main(params: Params, model_dir: str, builtin: str, pool: str, out: str, table_out: str, metrics_out: str) -> None:
    """`builtin` is prepare_data's pool (the KL set comes from its tail); `pool` is calibration.path,
    the same file unless it names a user's file."""
    c = params.calibration
    user_file = pool if Path(pool).resolve() != Path(builtin).resolve() else None
    check_calibration(c, model_dir, user_file)
    check_reachable(skeleton(model_dir, params.attention.granularity, params.model), params)
    tokenizer, overlap = load_tokenizer(model_dir, params.model), params.data.overlap_ngram
    windows, kl_windows = candidate_pool(c, tokenizer, read_texts(builtin), user_file, overlap_ngram=overlap)
    model, checkpoints = None, None  # one candidate: nothing to search, nothing to resume
    if c.candidates > 1:
        model = load_model(model_dir, params.model, granularity=params.attention.granularity)
        code = code_digest(__file__)
        checkpoints = CHECKPOINTS / resume_key(folder_digest(model_dir), code, windows, kl_windows, params)
    selected, table = select_windows(model, windows, kl_windows, params, user_file is not None, checkpoints)
    table["pool"] = c.source or pool  # provenance, read into the model card by prune
    table["pool_sha256"] = "" if c.source else sha256_file(pool)
    write_parquet(pd.DataFrame({"input_ids": selected.tolist()}), out)
    write_parquet(table, table_out)
    write_json(calibration_metrics(table), metrics_out)
    if checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    winner = table.loc[table.selected].iloc[0]
    log.info(
        "wrote %s: candidate %d of %d (%d windows x %d tokens from %s), KL %s",
        out,
        winner.candidate,
        len(table),
        *selected.shape,
        winner.pool,
        "n/a (no search)" if pd.isna(winner.kl) else f"{winner.kl:.5f}",
    )


if __name__ == "__main__":
    run_stage("select_calibration", main)
