"""The run's pruning plan: its criterion's scores under its allocation, or, for Wanda-sp under its own
uniform allocation, a plan made layer by layer on the calibration windows as FLAP's code does it."""

from __future__ import annotations

import pandas as pd
import torch
from transformers import PreTrainedModel

from nirvana.core.params import Params
from nirvana.method.allocation import allocate_for_model, allocation_mode, uniform_layer_counts, unit_sizes
from nirvana.method.criteria import wanda_sp_sequential


def layer_by_layer(params: Params) -> bool:
    """Whether the plan is made layer by layer on the model's activations (Wanda-sp under its own
    uniform allocation, as FLAP's code runs it), so allocation needs the weights and the windows."""
    return params.method == "wanda_sp" and allocation_mode(params) == "uniform"


def plan_for(
    model: PreTrainedModel, scores: pd.DataFrame, params: Params, sparsity: float, windows: torch.Tensor | None = None
) -> pd.DataFrame:
    """The plan of a run of one criterion (one of `nirvana.method.selection.candidate_runs`) at `sparsity`. Layer by
    layer (`layer_by_layer`) it needs the dense `model` and the calibration `windows`, and zeroes the
    removed units in `model`."""
    a = params.allocation
    if layer_by_layer(params):
        assert windows is not None, "Wanda-sp's layer-by-layer plan needs the calibration windows"
        attn, mlp = uniform_layer_counts(scores, sparsity, *unit_sizes(model), a.mlp_multiple, a.attn_multiple)
        return wanda_sp_sequential(model, windows, params.saliency.batch_size, {"attn": attn, "mlp": mlp})
    mode = allocation_mode(params)
    standardised = params.method == "flap"  # FLAP's criterion already standardises its columns
    gamma = None if isinstance(params.gamma, str) else params.gamma  # auto: one number per choice (selection)
    return allocate_for_model(
        model, scores, sparsity, gamma, a.mlp_multiple, mode, a.attn_multiple, a.band, standardised
    )
