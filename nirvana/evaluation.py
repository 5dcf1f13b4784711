"""Perplexity and parameter counts of dense and pruned models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.models import get_adapter


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over all positions of non-overlapping windows."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def param_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters (tied weights once) and those of attention+MLP projections."""
    adapter = get_adapter(model.config)
    prunable = sum(p.numel() for layer in adapter.layers(model) for p in adapter.prunable_params(layer))
    total = sum(p.numel() for p in model.parameters())
    return {"params_total": total, "params_attn_mlp": prunable}
