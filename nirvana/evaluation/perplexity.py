"""Perplexity on the held-out sets and parameter counts of dense and pruned models."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nirvana.core.data import bos_id, read_texts, token_stream, windows
from nirvana.method.forward import IGNORE, logits_and_labels
from nirvana.models import get_adapter


def held_out(
    corpora_dir: str | Path, name: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int, seq_len: int
) -> torch.Tensor:
    """The held-out set `name` (wiki, books) as `evaluate` scores it: its first `max_tokens` tokens in
    `seq_len`-token windows, each led by BOS where the tokenizer starts texts with one."""
    stream = token_stream(read_texts(Path(corpora_dir) / f"{name}.parquet"), tokenizer, max_tokens)
    return windows(stream, seq_len, bos_id(tokenizer))


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over every predicted position of non-overlapping windows (for an
    encoder-decoder model: the prefix-LM loss of each window's second half, `nirvana.method.forward`)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits, targets = logits_and_labels(model, batch)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE).sum())
    return math.exp(total_nll / total_tokens)


def param_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters (tied weights once) and those of attention+MLP projections."""
    adapter = get_adapter(model.config)
    prunable = sum(p.numel() for layer in adapter.layers(model) for p in adapter.prunable_params(layer))
    total = sum(p.numel() for p in model.parameters())
    return {"params_total": total, "params_attn_mlp": prunable}
