"""Stage prune: physically remove the planned units and save a loadable HF folder with its model card."""

from functools import partial

import pandas as pd

from nirvana.core.io import folder_digest, log, write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.deploy.card import calibration_record, model_card, prune_record, selected_params, selection_record
from nirvana.evaluation.perplexity import param_counts
from nirvana.method.surgery import prune_model, save_model
from nirvana.models import get_adapter
from nirvana.models.loading import load_model, load_tokenizer
from nirvana.pipeline.checks import check_model


def main(
    params: Params,
    model_dir: str,
    plan: str,
    plans: str,
    calibration: str,
    candidates: str,
    out_dir: str,
    metrics_out: str,
) -> None:
    """`plans` (allocate_sparsity's choices), `calibration` and `candidates` (select_calibration's
    outputs) are read for the model card: what was chosen, among what."""
    check_model(model_dir)
    model = load_model(model_dir, params.model, granularity=params.attention.granularity)
    adapter = get_adapter(model.config)  # once: surgery hands it down
    dense = param_counts(model)
    prune_model(model, pd.read_parquet(plan), adapter=adapter)
    pruned = param_counts(model)
    removed = 1 - pruned["params_attn_mlp"] / dense["params_attn_mlp"]
    metrics = {
        "dense": dense,
        "pruned": pruned,
        "sparsity_requested": params.sparsity,
        "sparsity_realised": round(removed, 6),
    }
    choices = pd.read_parquet(plans)
    calibrated, selected = calibration_record(calibration, candidates), selection_record(params, choices)
    record = prune_record(selected_params(params, choices), model_dir, model, metrics, calibrated, selected)
    save_model(model, load_tokenizer(model_dir, params.model), out_dir, card=partial(model_card, record))
    # which model this run made: `nirvana report` credits evaluate's numbers only to the model they measured
    write_json(metrics | {"model_digest": folder_digest(out_dir)}, metrics_out)
    log.info(
        "wrote %s (with its model card): %d -> %d parameters, attention+MLP sparsity %.4f (requested %.4f)",
        out_dir,
        dense["params_total"],
        pruned["params_total"],
        removed,
        params.sparsity,
    )


if __name__ == "__main__":
    run_stage("prune", main)
