"""Every pruning criterion behind the `method` param: NIRVANA and the baselines that share its
units, allocation and surgery (method doc, "Baselines that share the same pipeline").

A criterion is `(model, windows, batch_size) -> DataFrame` with one row per unit (layer, module,
unit, score); higher scores are kept. It leaves the model as it found it. Adding one: its function in
`CRITERIA`, its name and allocation in `nirvana.core.params.METHODS`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.method.forward import IGNORE, model_inputs
from nirvana.method.saliency import gradient_scores, nirvana_scores, score_table
from nirvana.models import Adapter, get_adapter, pool
from nirvana.models.base import ATTENTION

Criterion = Callable[[PreTrainedModel, torch.Tensor, int], pd.DataFrame]

RANDOM_SEED = 0
"""Fixed seed of the random baseline: its plan depends on the model's shape only, not on the calibration
windows, so every calibration candidate prunes the same units."""


def magnitude_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """S = |w| summed over each unit (the release's own baseline); needs no data."""
    adapter = get_adapter(model.config)
    return score_table(model, lambda layer, module: adapter.unit_scores(layer, module, lambda p: p.detach().abs()))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, total_samples: int) -> torch.Tensor:
    """This micro-batch's share of the mean next-token cross-entropy over the whole calibration set."""
    predicted = total_samples * int((labels[0] != IGNORE).sum())
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll / predicted


def taylor_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """LLM-Pruner's first-order Taylor criterion: S = |w * dL/dw|, L the language-model loss."""
    return gradient_scores(model, windows, batch_size, lm_loss)


class ColumnStats:
    """Per-column count, mean and sum of squared deviations of a Linear's input over every token seen,
    merged batch by batch (Chan et al.) in float64 on the CPU, so no activation is kept."""

    def __init__(self, columns: int) -> None:
        self.count = 0
        self.mean = torch.zeros(columns, dtype=torch.float64)
        self.m2 = torch.zeros(columns, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().flatten(0, -2).double()
        n, mean = x.shape[0], x.mean(dim=0)
        m2 = (x - mean).pow(2).sum(dim=0).cpu()
        mean = mean.cpu()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    def norm(self) -> torch.Tensor:
        """||x_j||_2 over all tokens: sqrt(sum x^2) = sqrt(m2 + n * mean^2)."""
        return (self.m2 + self.count * self.mean.pow(2)).sqrt()


class Fluctuation:
    """FLAP's running "fluctuation" of each input column, as its code computes it (lib/layerwrapper.py,
    BiasGPT with WIFV), one calibration window at a time: the mean is a running mean of window means,
    the first window adds nothing, and window k >= 1 scales the estimate by (k-1)/k and adds
    sum_t (x_t - mean)^2 / (k+1) around the mean that already includes it (the code's old and new
    means are one tensor, updated in place). Float64 on the CPU."""

    def __init__(self, columns: int) -> None:
        self.windows = 0
        self.mean = torch.zeros(columns, dtype=torch.float64)
        self.value = torch.zeros(columns, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        for window in x.detach().double().cpu().reshape(-1, x.shape[-2], x.shape[-1]):  # (tokens, columns)
            k = self.windows
            self.mean = self.mean * (k / (k + 1)) + window.mean(dim=0) / (k + 1)
            if k > 0:
                self.value = self.value * ((k - 1) / k) + (window - self.mean).pow(2).sum(dim=0) / (k + 1)
            self.windows += 1


Stats = ColumnStats | Fluctuation


class _Done(Exception):
    """Raised by a hook once every recorded Linear has seen its input: the rest of the forward is not needed."""


@contextmanager
def _recording(linears: list[nn.Linear], stats: dict[nn.Linear, Stats]) -> Iterator[None]:
    """Forward pre-hooks that feed every input of `linears` into its stats, removed on exit. Once all of
    them have run in a forward pass, the pass stops (`_Done`)."""
    seen: set[nn.Linear] = set()

    def hook(linear: nn.Linear, args: tuple) -> None:
        stats[linear].update(args[0])
        seen.add(linear)
        if len(seen) == len(stats):
            seen.clear()
            raise _Done

    hooks = [linear.register_forward_pre_hook(hook) for linear in linears]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def input_statistics(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, linears: list[nn.Linear], kind: type = ColumnStats
) -> dict[nn.Linear, Stats]:
    """Input statistics (`kind`) of each of `linears` over every token of `windows`, streamed by
    micro-batch; each forward pass stops at the last of `linears`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stats = {linear: kind(linear.in_features) for linear in linears}
    with _recording(linears, stats):
        for start in tqdm(range(0, len(windows), batch_size), desc="activations", unit="batch", leave=False):
            with suppress(_Done):
                model(**model_inputs(model, windows[start : start + batch_size].to(device)), use_cache=False)
    model.train(was_training)
    return stats


def _output_projections(adapter: Adapter, layers: list[nn.Module]) -> list[nn.Linear]:
    return [adapter.output_projection(layer, module) for layer in layers for module in adapter.modules(layer)]


def _wanda_sp_layer(adapter: Adapter, layer: nn.Module, stats: dict[nn.Linear, Stats]) -> dict[str, torch.Tensor]:
    """Wanda-sp's unit scores of one layer, per module: for each input column j of the output
    projection, mean_i |W_ij| * ||x_j||_2 (FLAP's `prune_wanda_sp`), summed over the unit's columns
    (a head's head_dim columns; a KV group's, all its query heads')."""
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules(layer):
        proj = adapter.output_projection(layer, module)
        s = stats[proj]
        assert isinstance(s, ColumnStats)
        column = proj.weight.detach().double().cpu().abs().mean(dim=0) * s.norm()
        out[module] = adapter.output_columns(layer, module, column).sum(dim=1)
    return out


def wanda_sp_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """Wanda-sp from the dense model's activations (`_wanda_sp_layer` in every layer). Under its own
    uniform allocation the plan is made layer by layer instead (`wanda_sp_sequential`)."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    stats = input_statistics(model, windows, batch_size, _output_projections(adapter, layers))
    scores = {index: _wanda_sp_layer(adapter, layer, stats) for index, layer in enumerate(layers)}
    return score_table(model, lambda layer, module: scores[layers.index(layer)][module].float())


def wanda_sp_sequential(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, remove: dict[str, int]
) -> pd.DataFrame:
    """Wanda-sp as FLAP's code runs it: layer by layer, each scored on calibration inputs that passed
    through the earlier layers already pruned, removing the `remove[pool]` lowest units of each module
    (the same count in every layer). Returns the plan; zeroes the removed units in `model` (a copy)."""
    adapter = get_adapter(model.config)
    rows = []
    for index, layer in enumerate(tqdm(adapter.layers(model), desc="wanda_sp layers", unit="layer", leave=False)):
        stats = input_statistics(model, windows, batch_size, _output_projections(adapter, [layer]))
        drop = {}
        for module, scores in _wanda_sp_layer(adapter, layer, stats).items():
            order = sorted(range(len(scores)), key=lambda u: (scores[u].item(), u))
            dropped = set(order[: remove[pool(module)]])
            drop[module] = torch.tensor(sorted(dropped), dtype=torch.long)
            rows += [(index, module, u, float(scores[u]), u not in dropped) for u in range(len(scores))]
        adapter.zero_units(layer, drop)
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score", "keep"])


def _standardised(metric: torch.Tensor) -> torch.Tensor:
    """FLAP's per-layer, per-module standardisation of column metrics (std with n - 1); constant
    metrics (FLAP would divide by zero) score 0."""
    spread = metric.std()
    return (metric - metric.mean()) / spread if spread > 0 else torch.zeros_like(metric)


def flap_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """FLAP (`prune_flap`, WIFV, AL-AM): per input column j of o_proj / down_proj the weighted input
    fluctuation Fluct(x_j) * ||W[:, j]||^2, squared for attention; standardised over the layer's
    columns of that module; a unit's score is the mean z-score of its columns (a channel's, its own).
    `input_mean` keeps each unit's column means for bias compensation."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    stats = input_statistics(model, windows, batch_size, _output_projections(adapter, layers), Fluctuation)
    rows = []
    for index, layer in enumerate(layers):
        for module in adapter.modules(layer):
            proj = adapter.output_projection(layer, module)
            s = stats[proj]
            assert isinstance(s, Fluctuation)
            metric = s.value * proj.weight.detach().double().cpu().pow(2).sum(dim=0)
            if pool(module) == ATTENTION:
                metric = metric.pow(2)
            scores = adapter.output_columns(layer, module, _standardised(metric)).mean(dim=1).tolist()
            means = adapter.output_columns(layer, module, s.mean).tolist()
            rows += [(index, module, unit, scores[unit], means[unit]) for unit in range(len(scores))]
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score", "input_mean"])


def random_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """Uniform random scores from RANDOM_SEED, drawn layer by layer and module by module."""
    adapter = get_adapter(model.config)
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    return score_table(model, lambda layer, module: torch.rand(adapter.unit_count(layer, module), generator=generator))


CRITERIA: dict[str, Criterion] = {
    "nirvana": nirvana_scores,
    "magnitude": magnitude_scores,
    "taylor": taylor_scores,
    "wanda_sp": wanda_sp_scores,
    "flap": flap_scores,
    "random": random_scores,
}
"""Criterion name -> its scoring function; the same names, with their allocations, are `nirvana.core.params.METHODS`."""
