"""NIRVANA saliency (method §1): S(w) = |w * df/dw| with f the NTK-derived output function."""

from __future__ import annotations

import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.models import MODULES, get_adapter


def output_function(logits: torch.Tensor, total_samples: int) -> torch.Tensor:
    """f = mean over (sample, vocab) of the max over positions of the logits.

    Normalised by the *whole* calibration set, so summing f over micro-batches gives f."""
    return logits.float().amax(dim=1).sum() / (total_samples * logits.shape[-1])


def accumulate_gradients(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> None:
    """Leave G = df/dw (summed over micro-batches) in `.grad` of the prunable parameters only."""
    adapter = get_adapter(model.config)
    model.requires_grad_(False)
    for layer in adapter.layers(model):
        for p in adapter.prunable_params(layer):
            p.requires_grad_(True)
            p.grad = None
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(windows), batch_size), desc="saliency", unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        output_function(logits, len(windows)).backward()


def _weight_saliency(p: torch.nn.Parameter) -> torch.Tensor:
    """|w * G| for one parameter whose `.grad` holds the accumulated gradient."""
    assert p.grad is not None, "accumulate_gradients must run first"
    return (p.detach().float() * p.grad.float()).abs()


def nirvana_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """One row per unit: layer, module, unit, score (L1 sum of |w * G| over the unit)."""
    adapter = get_adapter(model.config)
    was_training = model.training
    model.eval()
    accumulate_gradients(model, windows, batch_size)
    rows = []
    for index, layer in enumerate(adapter.layers(model)):
        for module in MODULES:
            scores = adapter.unit_scores(layer, module, _weight_saliency)
            rows += [(index, module, unit, float(s)) for unit, s in enumerate(scores.tolist())]
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.train(was_training)
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score"])


CRITERIA = {"nirvana": nirvana_scores}
