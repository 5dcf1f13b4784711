"""NIRVANA saliency (method §1): S(w) = |w * df/dw| with f the NTK-derived output function.

The gradient machinery is shared with the Taylor baseline (`nirvana.criteria`), which only
swaps the scalar being differentiated."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.forward import logits_and_labels
from nirvana.models import get_adapter

Objective = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(logits, labels, windows in the whole set) -> this micro-batch's share of the scalar to differentiate
(labels as `nirvana.forward.labels` gives them)."""


def output_function(logits: torch.Tensor, total_samples: int) -> torch.Tensor:
    """f = mean over (sample, vocab) of the max over positions of the logits.

    Normalised by the *whole* calibration set, so summing f over micro-batches gives f."""
    return logits.float().amax(dim=1).sum() / (total_samples * logits.shape[-1])


def ntk_objective(logits: torch.Tensor, labels: torch.Tensor, total_samples: int) -> torch.Tensor:
    """NIRVANA's objective: the output function, which ignores the tokens."""
    return output_function(logits, total_samples)


def accumulate_gradients(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, objective: Objective = ntk_objective
) -> None:
    """Leave G = d(objective)/dw (summed over micro-batches) in `.grad` of the prunable parameters only."""
    adapter = get_adapter(model.config)
    model.requires_grad_(False)
    for layer in adapter.layers(model):
        for p in adapter.prunable_params(layer):
            p.requires_grad_(True)
            p.grad = None
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(windows), batch_size), desc="saliency", unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits, labels = logits_and_labels(model, batch)
        objective(logits, labels, len(windows)).backward()


def _weight_saliency(p: torch.nn.Parameter) -> torch.Tensor:
    """|w * G| for one parameter whose `.grad` holds the accumulated gradient."""
    assert p.grad is not None, "accumulate_gradients must run first"
    return (p.detach().float() * p.grad.float()).abs()


def score_table(model: PreTrainedModel, per_unit: Callable[[nn.Module, str], torch.Tensor]) -> pd.DataFrame:
    """One row per unit (layer, module, unit, score), `per_unit(layer, module)` giving a module's unit scores."""
    adapter = get_adapter(model.config)
    rows = []
    for index, layer in enumerate(adapter.layers(model)):
        for module in adapter.modules(layer):
            scores = per_unit(layer, module)
            rows += [(index, module, unit, float(s)) for unit, s in enumerate(scores.tolist())]
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score"])


def gradient_scores(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, objective: Objective
) -> pd.DataFrame:
    """L1 sum over each unit of |w * G|, G the gradient of `objective` over the whole set.

    Leaves the model as it found it: no gradients, nothing trainable, same train/eval mode."""
    adapter = get_adapter(model.config)
    was_training = model.training
    model.eval()
    accumulate_gradients(model, windows, batch_size, objective)
    table = score_table(model, lambda layer, module: adapter.unit_scores(layer, module, _weight_saliency))
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.train(was_training)
    return table


def nirvana_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """One row per unit: layer, module, unit, score (L1 sum of |w * G| over the unit)."""
    return gradient_scores(model, windows, batch_size, ntk_objective)
