"""Stage allocate_sparsity: which units to keep, from two global pools and gamma (method §2) or a
baseline's allocation (`allocation.mode`, by default the method's own)."""

import pandas as pd

from nirvana.allocation import allocate_for_model, allocation_mode, check_reachable, layer_widths
from nirvana.io import log, write_csv, write_parquet
from nirvana.modeling import skeleton
from nirvana.params import Params
from nirvana.stage import run_stage


def main(params: Params, model_dir: str, scores: str, plan_out: str, widths_out: str) -> None:
    mode, model = allocation_mode(params), skeleton(model_dir, params.attention.granularity)
    check_reachable(model, params)
    plan = allocate_for_model(
        model,
        pd.read_parquet(scores),
        params.sparsity,
        params.gamma,
        params.allocation.mlp_multiple,
        mode,
        params.allocation.attn_multiple,
    )
    write_parquet(plan, plan_out)
    widths = layer_widths(plan)
    write_csv(widths, widths_out)
    log.info(
        "wrote %s (%s allocation): keeps %d/%d attention units, %d/%d MLP channels",
        plan_out,
        mode,
        widths.attn_kept.sum(),
        widths.attn_dense.sum(),
        widths.mlp_kept.sum(),
        widths.mlp_dense.sum(),
    )


if __name__ == "__main__":
    run_stage("allocate_sparsity", main)
