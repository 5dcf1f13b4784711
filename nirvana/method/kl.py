"""The held-out KL: how far a pruned model's output distribution strays from the dense model's,
averaged over every token of a held-out set (method §3). The dense model's half of the KL is computed once
(`Reference`), and the outputs of the leading layers a plan leaves dense are replayed, not recomputed
(`HeldOut`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import takewhile

import torch
from torch import nn
from transformers import PreTrainedModel

from nirvana.method.forward import is_seq2seq, model_inputs
from nirvana.models import get_adapter


def chunk_log_probs(model: PreTrainedModel, windows: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities over the vocabulary of one chunk of windows (on the CPU)."""
    device = next(model.parameters()).device
    logits = model(**model_inputs(model, windows.to(device)), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def log_probs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """`chunk_log_probs` of `windows`, `batch_size` windows at a time."""
    for chunk in windows.split(batch_size):
        yield chunk_log_probs(model, chunk)


BLOCK = 64
"""Vocabulary entries summed in float32 before float64 takes over (`vocab_sums`)."""


def vocab_sums(terms: torch.Tensor) -> torch.Tensor:
    """Sums over the last (vocabulary) dimension: float32 within blocks of `BLOCK` entries, float64 across
    them. A token's KL is the difference of two such sums, each several times its size: float32 throughout
    loses digits of it (tests/test_selection.py), float64 throughout took 5 times as long."""
    block = math.gcd(terms.shape[-1], BLOCK)
    return terms.unflatten(-1, (-1, block)).sum(-1).double().sum(-1)


def p_log_q(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p log q per token (float64), a term with p = 0 adding 0 even where log q = -inf (0 x -inf would
    be NaN). Overwrites `log_q` with the terms, which saves a second buffer of a chunk's size."""
    sums = vocab_sums(log_q.mul_(p))
    undefined = sums.isnan()
    if undefined.any():
        sums[undefined] = vocab_sums(torch.where(p[undefined] > 0, log_q[undefined], 0.0))
    return sums


@dataclass
class Reference:
    """The dense model's distribution on one chunk of the KL set: p, and per token sum_v p log p (float64), the
    half of KL(p || q) = sum_v p log p - sum_v p log q that no plan changes, so it is computed once."""

    p: torch.Tensor
    p_log_p: torch.Tensor

    @classmethod
    def of(cls, log_p: torch.Tensor) -> Reference:
        """From the chunk's dense log-probabilities, which it overwrites."""
        p = log_p.exp()
        return cls(p, p_log_q(p, log_p))

    def kl_sum(self, log_q: torch.Tensor) -> float:
        """KL(p || q) summed over the chunk's tokens; overwrites `log_q` (`p_log_q`)."""
        return (self.p_log_p - p_log_q(self.p, log_q)).sum().item()


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two sets of named tensors are equal: the same names, dtypes, shapes and values."""
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


def outside(model: nn.Module, layers: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors no layer holds: embeddings, rotary frequencies, final norm, head."""
    inside = {id(t) for layer in layers for t in tensors(layer).values()}
    return {name: t for name, t in tensors(model).items() if id(t) not in inside}


def shared_layers(model: PreTrainedModel, dense: PreTrainedModel) -> list[nn.Module]:
    """The leading layers of `model` that hold the dense model's tensors, where everything outside the layers
    is the dense model's too: their outputs on the KL set are the dense model's, bit for bit. None for an
    encoder-decoder, whose layers pass more than hidden states to the next."""
    if is_seq2seq(model):
        return []
    adapter = get_adapter(model.config)
    mine, theirs = adapter.layers(model), adapter.layers(dense)
    if not same(outside(model, mine), outside(dense, theirs)):
        return []
    pairs = takewhile(lambda pair: same(tensors(pair[0]), tensors(pair[1])), zip(mine, theirs, strict=True))
    return [layer for layer, _ in pairs]


@contextmanager
def skipping(layers: list[nn.Module], output: torch.Tensor | None) -> Iterator[None]:
    """Let `layers` answer `output` (what the last of them returned on this chunk before) without computing,
    the model's forward going on from there; then give each its own forward back (accelerate's, if any)."""
    own = [vars(layer).get("forward") for layer in layers]
    for layer in layers:
        setattr(layer, "forward", lambda *args, **kwargs: output)  # noqa: B010 (an instance attribute, on purpose)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                delattr(layer, "forward")
            else:
                setattr(layer, "forward", forward)  # noqa: B010


@contextmanager
def recording(layers: list[nn.Module], outputs: list[torch.Tensor]) -> Iterator[None]:
    """Append to `outputs` what the last of `layers` returns, if a tensor (`skipping` replays nothing else)."""
    if not layers:
        yield
        return

    def keep(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output)

    handle = layers[-1].register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class HeldOut:
    """The held-out KL set with the dense model's distributions on it, computed once, and the outputs of the
    leading layers that plans leave as the dense model has them (by how many), recorded by the first plan
    that runs them and replayed for the next: the dense model must stay as it is, as `reference` already
    requires."""

    windows: torch.Tensor
    reference: list[Reference]
    batch_size: int
    dense: PreTrainedModel | None = None
    prefixes: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, dense: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> HeldOut:
        reference = [Reference.of(log_p) for log_p in log_probs(dense, windows, batch_size)]
        return cls(windows, reference, batch_size, dense)

    @torch.no_grad()
    def kl(self, model: PreTrainedModel) -> float:
        """KL(P_dense || Q_model) = sum_v p (log p - log q), averaged over every token of the KL set."""
        layers = shared_layers(model, self.dense) if self.dense is not None else []
        start = max((k for k in self.prefixes if k <= len(layers)), default=0)
        recorded: list[torch.Tensor] = []
        total, tokens = 0.0, 0
        for i, (reference, windows) in enumerate(zip(self.reference, self.windows.split(self.batch_size), strict=True)):
            replay = self.prefixes[start][i] if start else None
            with skipping(layers[:start], replay), recording(layers[start:], recorded):
                total += reference.kl_sum(chunk_log_probs(model, windows))
            tokens += reference.p_log_p.numel()
        if len(recorded) == len(self.reference):
            self.prefixes[len(layers)] = recorded
        return total / tokens
