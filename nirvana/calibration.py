"""KL-divergence calibration selection (method §3): among seeded candidate calibration sets,
keep the one whose pruned model shifts the output distribution least on a held-out KL set."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nirvana.criteria import CRITERIA
from nirvana.data import bos_id, dataset_texts, hold_out, token_stream, user_windows, windows
from nirvana.forward import model_inputs
from nirvana.params import CalibrationParams, Params
from nirvana.plan import plan_for
from nirvana.saliency import enable_checkpointing
from nirvana.surgery import prune_model


def candidate_pool(
    c: CalibrationParams, tokenizer: PreTrainedTokenizerBase, builtin_texts: list[str], user_file: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows candidates are drawn from (the built-in pool, a user's file or a dataset), and
    the held-out KL set: the built-in pool's tail, never drawn from."""
    bos = bos_id(tokenizer)
    stream, kl_windows = hold_out(token_stream(builtin_texts, tokenizer), c.kl_samples, c.kl_seq_len, bos)
    if user_file:
        return user_windows(user_file, tokenizer, c.seq_len), kl_windows
    if c.source:
        stream = token_stream(dataset_texts(c.source), tokenizer)
    return windows(stream, c.seq_len, bos), kl_windows


@torch.no_grad()
def log_probs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Float32 log-probabilities over the vocabulary, one chunk of windows at a time (on the CPU)."""
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        logits = model(**model_inputs(model, windows[start : start + batch_size].to(device)), use_cache=False).logits
        yield torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def kl_to_reference(
    reference: list[torch.Tensor], model: PreTrainedModel, windows: torch.Tensor, batch_size: int
) -> float:
    """KL(P_ref || Q_model) = sum_v p (log p - log q), averaged over every token of `windows`.

    `reference` holds the dense model's log-probabilities in the same chunks."""
    total, tokens = 0.0, 0
    for log_p, log_q in zip(reference, log_probs(model, windows, batch_size), strict=True):
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        tokens += log_p.shape[0] * log_p.shape[1]
    return total / tokens


def draw(pool: torch.Tensor, num_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw, without replacement, of `num_samples` pool windows."""
    if num_samples > len(pool):
        raise ValueError(f"calibration.num_samples = {num_samples} exceeds the {len(pool)} windows available")
    return np.sort(np.random.default_rng(seed).choice(len(pool), size=num_samples, replace=False))


def prune_with(model: PreTrainedModel, windows: torch.Tensor, params: Params, sparsity: float) -> PreTrainedModel:
    """A pruned copy of `model`, scored on `windows` with the configured criterion and allocation."""
    scores = CRITERIA[params.method](model, windows, params.saliency.batch_size)
    pruned = copy.deepcopy(model)
    prune_model(pruned, plan_for(pruned, scores, params, sparsity, windows))
    return pruned


def search(
    model: PreTrainedModel,
    pool: torch.Tensor,
    kl_windows: torch.Tensor,
    params: Params,
    measure: Callable[[PreTrainedModel], dict] | None = None,
) -> pd.DataFrame:
    """One row per candidate: candidate, seed, kl, windows (pool indices), selected; plus
    whatever `measure` reports on each pruned candidate (benchmarks use it)."""
    c = params.calibration
    sparsity = params.sparsity if c.select_at_sparsity is None else c.select_at_sparsity
    reference = list(log_probs(model, kl_windows, c.kl_batch_size))  # the dense model's work, once
    if params.saliency.gradient_checkpointing:
        enable_checkpointing(model)
    rows = []
    for candidate in tqdm(range(c.candidates), desc="candidates", unit="set"):
        seed = c.seed + candidate
        picks = draw(pool, c.num_samples, seed)
        pruned = prune_with(model, pool[torch.from_numpy(picks)], params, sparsity)
        kl = kl_to_reference(reference, pruned, kl_windows, c.kl_batch_size)
        extra = measure(pruned) if measure else {}
        rows.append({"candidate": candidate, "seed": seed, "kl": kl, "windows": picks.tolist(), **extra})
        del pruned
    table = pd.DataFrame(rows)
    table["selected"] = table.index == int(table["kl"].idxmin())
    return table


def select(
    model: PreTrainedModel | None, pool: torch.Tensor, kl_windows: torch.Tensor, params: Params, verbatim: bool = False
) -> tuple[torch.Tensor, pd.DataFrame]:
    """The selected windows and the candidates table.

    With one candidate there is no search: a seeded draw, or the whole pool if `verbatim`."""
    c = params.calibration
    if c.candidates == 1:
        picks = np.arange(len(pool)) if verbatim else draw(pool, c.num_samples, c.seed)
        row = {"candidate": 0, "seed": c.seed, "kl": float("nan"), "windows": picks.tolist(), "selected": True}
        return pool[torch.from_numpy(picks)], pd.DataFrame([row])
    assert model is not None, "a search needs the dense model"
    table = search(model, pool, kl_windows, params)
    return pool[torch.tensor(table.loc[table["selected"], "windows"].iloc[0])], table


def summary(table: pd.DataFrame) -> dict[str, float | int]:
    """The metrics of a selection: the winner's KL against the median and worst candidate."""
    kl = table["kl"].dropna()
    if kl.empty:  # one candidate: nothing was measured
        return {"candidates": len(table)}
    return {
        "candidates": len(table),
        "kl_selected": float(table.loc[table["selected"], "kl"].iloc[0]),
        "kl_median": float(kl.median()),
        "kl_worst": float(kl.max()),
    }
