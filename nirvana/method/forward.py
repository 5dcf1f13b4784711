"""One forward pass over token windows, for decoder-only and encoder-decoder models alike.

A decoder-only model predicts every next token of a window. An encoder-decoder model (T5) reads a
window as a prefix-LM example: the encoder gets the first half, the decoder predicts the second half
from its shifted copy. Perplexity, KL, saliency and fine-tuning all use this one split."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

IGNORE = -100  # label of a position that predicts nothing


def is_seq2seq(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def split(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder input, decoder target) of a prefix-LM example: the first and second half of each window."""
    half = windows.shape[1] // 2
    return windows[:, :half], windows[:, half:]


def model_inputs(model: PreTrainedModel, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword arguments of the model's forward for `windows` (already on the model's device)."""
    if not is_seq2seq(model):
        return {"input_ids": windows}
    source, target = split(windows)
    shift: Any = model.prepare_decoder_input_ids_from_labels  # seq2seq models have it
    return {"input_ids": source, "decoder_input_ids": shift(labels=target)}


def labels(model: PreTrainedModel, windows: torch.Tensor) -> torch.Tensor:
    """The token each logit position predicts, IGNORE where none (a window's last position)."""
    if is_seq2seq(model):
        return split(windows)[1]
    return torch.cat([windows[:, 1:], torch.full_like(windows[:, :1], IGNORE)], dim=1)


def logits_and_labels(model: PreTrainedModel, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one forward pass (no KV cache) and the labels they predict, aligned position by position."""
    out = model(**model_inputs(model, windows), use_cache=False)
    return out.logits, labels(model, windows)
