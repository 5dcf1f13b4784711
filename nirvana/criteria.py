"""Every pruning criterion behind the `method` param: NIRVANA and the baselines that share its
units, allocation and surgery (method doc, "Baselines that share the same pipeline").

A criterion is `(model, windows, batch_size) -> DataFrame` with one row per unit (layer, module,
unit, score); higher scores are kept. It leaves the model as it found it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.forward import IGNORE, model_inputs
from nirvana.models import get_adapter
from nirvana.saliency import gradient_scores, nirvana_scores, score_table

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

    def variance(self) -> torch.Tensor:
        """Variance over tokens (divided by the token count)."""
        return self.m2 / self.count

    def norm(self) -> torch.Tensor:
        """||x_j||_2 over all tokens: sqrt(sum x^2) = sqrt(m2 + n * mean^2)."""
        return (self.m2 + self.count * self.mean.pow(2)).sqrt()


@contextmanager
def _recording(linears: list[nn.Linear]) -> Iterator[dict[nn.Linear, ColumnStats]]:
    """Forward pre-hooks that feed every input of `linears` into its ColumnStats, removed on exit."""
    stats = {linear: ColumnStats(linear.in_features) for linear in linears}
    hooks = [linear.register_forward_pre_hook(lambda _, args, s=s: s.update(args[0])) for linear, s in stats.items()]
    try:
        yield stats
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def input_statistics(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, linears: list[nn.Linear]
) -> dict[nn.Linear, ColumnStats]:
    """Input statistics of each of `linears` over every token of `windows`, streamed by micro-batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with _recording(linears) as stats:
        for start in tqdm(range(0, len(windows), batch_size), desc="activations", unit="batch", leave=False):
            model(**model_inputs(model, windows[start : start + batch_size].to(device)), use_cache=False)
    model.train(was_training)
    return stats


def _wanda_weight(stats: dict[nn.Linear, ColumnStats]) -> Callable[[nn.Parameter], torch.Tensor]:
    """Per weight |W_ij| * ||X_j||, X the owning Linear's input. A bias is the weight of a constant-1
    input, whose norm over T tokens is sqrt(T)."""

    norms: dict[torch.Tensor, torch.Tensor | float] = {}
    for linear, s in stats.items():
        norms[linear.weight] = s.norm()[None, :]
        if linear.bias is not None:
            norms[linear.bias] = s.count**0.5

    def per_weight(p: nn.Parameter) -> torch.Tensor:
        return p.detach().double().cpu().abs() * norms[p]

    return per_weight


def wanda_sp_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """Wanda-sp: S = |w| * ||x||_2 on every slice (q/k/v/gate/up rows see the normed hidden state,
    o_proj/down_proj columns their own inputs), summed over each unit."""
    adapter = get_adapter(model.config)
    linears = [linear for layer in adapter.layers(model) for linear in adapter.linears(layer)]
    per_weight = _wanda_weight(input_statistics(model, windows, batch_size, linears))
    return score_table(model, lambda layer, module: adapter.unit_scores(layer, module, per_weight))


def flap_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """FLAP's fluctuation: per input column j of o_proj / down_proj, Var(x_j) * ||W[:, j]||^2, summed over
    each unit's columns; `input_mean` keeps the unit's column means for bias compensation."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    projections = [adapter.output_projection(layer, m) for layer in layers for m in adapter.modules(layer)]
    stats = input_statistics(model, windows, batch_size, projections)
    rows = []
    for index, layer in enumerate(layers):
        for module in adapter.modules(layer):
            proj, n = adapter.output_projection(layer, module), adapter.unit_count(layer, module)
            s = stats[proj]
            fluctuation = s.variance() * proj.weight.detach().double().cpu().pow(2).sum(dim=0)
            scores = fluctuation.view(n, -1).sum(dim=1).float().tolist()
            means = s.mean.view(n, -1).tolist()
            rows += [(index, module, unit, scores[unit], means[unit]) for unit in range(n)]
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
