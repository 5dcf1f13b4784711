"""Stage allocate_sparsity: which units to keep, from two global pools and gamma (method §2) or a
baseline's allocation (`allocation.mode`, by default the method's own). With several criteria in
`method` or `gamma: auto` it prunes the model in memory once per choice and keeps the plan of lowest
held-out KL (nirvana.method.selection), so it loads the weights (the calibration search's winning plan is not
pruned again: its KL is in the candidates table); so does Wanda-sp's own allocation, which
prunes layer by layer on the calibration windows (FLAP's code). Otherwise it reads only the shape."""

import pandas as pd

from nirvana.core.data import read_texts, read_windows
from nirvana.core.errors import InputError
from nirvana.core.io import log, write_csv, write_json, write_parquet
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.method.allocation import check_reachable, plan_widths
from nirvana.method.calibration import kl_set, search_winner
from nirvana.method.kl import HeldOut
from nirvana.method.plan import layer_by_layer
from nirvana.method.selection import by_method, candidate_runs, plan_metrics, select_plan
from nirvana.models.loading import load_model, load_tokenizer, skeleton
from nirvana.pipeline.checks import check_model, check_windows


def main(
    params: Params,
    model_dir: str,
    calibration: str,
    builtin: str,
    candidates: str,
    saliency: str,
    plan_out: str,
    table_out: str,
    metrics_out: str,
    widths_out: str,
) -> None:
    """`calibration` is select_calibration's windows; `builtin` prepare_data's pool, whose tail is the
    held-out KL set; `candidates` the search's table, whose winning plan is not pruned again."""
    granularity, runs = params.attention.granularity, candidate_runs(params)
    model, windows, held_out, known = skeleton(model_dir, granularity, params.model), None, None, None
    check_reachable(model, params)
    scores = by_method(pd.read_parquet(saliency))
    missing = [m for m in params.methods if m not in scores]
    if missing:
        raise InputError(f"{saliency} has no scores for method {', '.join(missing)}: rerun compute_saliency")
    search = len(runs) > 1
    if search or any(layer_by_layer(run) for run in runs):
        lengths = [("calibration.kl_seq_len", params.calibration.kl_seq_len)] if search else []
        check_windows(calibration, check_model(model_dir, lengths, tokenizer=search))
        model, windows = load_model(model_dir, params.model, granularity=granularity), read_windows(calibration)
    if search:
        kl_windows = kl_set(params.calibration, load_tokenizer(model_dir, params.model), read_texts(builtin))
        held_out = HeldOut.of(model, kl_windows, params.calibration.kl_batch_size)
        known = search_winner(pd.read_parquet(candidates), params.sparsity)
    plan, table = select_plan(model, scores, params, params.sparsity, windows, held_out, known=known)
    write_parquet(plan, plan_out)
    write_parquet(table, table_out)
    write_json(plan_metrics(table), metrics_out)
    widths = plan_widths(plan)
    write_csv(widths, widths_out)
    chosen = table[table.selected].iloc[0]
    log.info(
        "wrote %s (%s, %s allocation, gamma %s; %d choices): keeps %d/%d attention units, %d/%d MLP channels",
        plan_out,
        chosen.method,
        chosen.allocation,
        chosen.gamma,
        len(table),
        widths.attn_kept.sum(),
        widths.attn_dense.sum(),
        widths.mlp_kept.sum(),
        widths.mlp_dense.sum(),
    )


if __name__ == "__main__":
    run_stage("allocate_sparsity", main)
