"""Stage prune: physically remove the planned units and save a loadable HF folder."""

import pandas as pd

from nirvana.evaluation import param_counts
from nirvana.io import log, write_json
from nirvana.modeling import load_model, load_tokenizer
from nirvana.params import Params
from nirvana.stage import run_stage
from nirvana.surgery import prune_model, save_model


def main(params: Params, model_dir: str, plan: str, out_dir: str, metrics_out: str) -> None:
    model = load_model(model_dir, granularity=params.attention.granularity)
    dense = param_counts(model)
    prune_model(model, pd.read_parquet(plan))
    pruned = param_counts(model)
    save_model(model, load_tokenizer(model_dir), out_dir)
    removed = 1 - pruned["params_attn_mlp"] / dense["params_attn_mlp"]
    write_json(
        {
            "dense": dense,
            "pruned": pruned,
            "sparsity_requested": params.sparsity,
            "sparsity_realised": round(removed, 6),
        },
        metrics_out,
    )
    log.info(
        "wrote %s: %d -> %d parameters, attention+MLP sparsity %.4f (requested %.4f)",
        out_dir,
        dense["params_total"],
        pruned["params_total"],
        removed,
        params.sparsity,
    )


if __name__ == "__main__":
    run_stage("prune", main)
