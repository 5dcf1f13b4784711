"""Stage allocate_sparsity: which units to keep, from two global pools and gamma (method §2) or a
baseline's allocation (`allocation.mode`, by default the method's own). Wanda-sp's own allocation
prunes layer by layer on the calibration windows (FLAP's code), so it loads the weights; every other
allocation reads only the model's shape."""

import pandas as pd

from nirvana.allocation import allocation_mode, check_reachable, layer_widths
from nirvana.checks import check_model, check_windows
from nirvana.data import read_windows
from nirvana.io import log, write_csv, write_parquet
from nirvana.modeling import load_model, skeleton
from nirvana.params import Params
from nirvana.plan import layer_by_layer, plan_for
from nirvana.stage import run_stage


def main(params: Params, model_dir: str, calibration: str, scores: str, plan_out: str, widths_out: str) -> None:
    granularity = params.attention.granularity
    model, windows = skeleton(model_dir, granularity), None
    check_reachable(model, params)
    if layer_by_layer(params):
        check_windows(calibration, check_model(model_dir, tokenizer=False))
        model, windows = load_model(model_dir, params.model, granularity=granularity), read_windows(calibration)
    plan = plan_for(model, pd.read_parquet(scores), params, params.sparsity, windows)
    write_parquet(plan, plan_out)
    widths = layer_widths(plan)
    write_csv(widths, widths_out)
    log.info(
        "wrote %s (%s allocation): keeps %d/%d attention units, %d/%d MLP channels",
        plan_out,
        allocation_mode(params),
        widths.attn_kept.sum(),
        widths.attn_dense.sum(),
        widths.mlp_kept.sum(),
        widths.mlp_dense.sum(),
    )


if __name__ == "__main__":
    run_stage("allocate_sparsity", main)
