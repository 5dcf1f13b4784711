"""NIRVANA saliency (method §1): S(w) = |w * df/dw| with f the NTK-derived output function.

The gradient machinery is shared with the Taylor baseline (`nirvana.method.criteria`), which only
swaps the scalar being differentiated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.method.forward import logits_and_labels
from nirvana.models import Slice, get_adapter
from nirvana.models.base import slice_sums

Objective = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(logits, labels, windows in the whole set) -> this micro-batch's share of the scalar to differentiate
(labels as `nirvana.method.forward.labels` gives them)."""


def output_function(logits: torch.Tensor, total_samples: int) -> torch.Tensor:
    """f = mean over (sample, vocab) of the max over positions of the logits.

    Normalised by the *whole* calibration set, so summing f over micro-batches gives f."""
    return logits.float().amax(dim=1).sum() / (total_samples * logits.shape[-1])


def ntk_objective(logits: torch.Tensor, labels: torch.Tensor, total_samples: int) -> torch.Tensor:
    """NIRVANA's objective: the output function, which ignores the tokens."""
    return output_function(logits, total_samples)


class UnitSaliency:
    """S = |w * G| summed over each unit, G the gradient over the whole set, built without ever holding
    every gradient on the model's device: after each micro-batch's backward a post-accumulate hook adds a
    weight's gradient into a float32 accumulator on the CPU and frees it; after the last micro-batch the
    hook turns G into float32 unit sums at once and drops the accumulator (method §1: |w * G| only at the end)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.adapter = get_adapter(model.config)
        self.parts: dict[tuple[int, str], list[torch.Tensor]] = {}  # one float32 sum per slice, in slice order
        self.owners: dict[nn.Parameter, list[tuple[torch.Tensor, Slice]]] = {}
        for index, layer in enumerate(self.adapter.layers(model)):
            for module in self.adapter.modules(layer):
                n = self.adapter.unit_count(layer, module)
                slices = self.adapter.slices(layer, module)
                self.parts[(index, module)] = [torch.zeros(n, dtype=torch.float32) for _ in slices]
                for part, s in zip(self.parts[(index, module)], slices, strict=True):
                    self.owners.setdefault(self.adapter.param(layer, s.param), []).append((part, s))
        self.totals: dict[nn.Parameter, torch.Tensor] = {}
        self.last = False

    def __call__(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: fold this micro-batch's gradient in; on the last one, score."""
        assert p.grad is not None
        grad = p.grad.detach().to("cpu", torch.float32)
        total = grad if p not in self.totals else self.totals.pop(p).add_(grad)
        p.grad = None
        if not self.last:
            self.totals[p] = total
            return
        saliency = (p.detach().to("cpu", torch.float32) * total).abs()
        for part, s in self.owners[p]:
            part += slice_sums(saliency, s, len(part))

    def table(self) -> pd.DataFrame:
        assert not self.totals, "a prunable weight got gradients before the last micro-batch but not in it"
        rows = []
        for (layer, module), parts in self.parts.items():
            total = torch.zeros_like(parts[0])
            for part in parts:  # summed in slice order, as `Adapter.unit_scores` does
                total += part
            rows += [(layer, module, unit, float(v)) for unit, v in enumerate(total.tolist())]
        return pd.DataFrame(rows, columns=["layer", "module", "unit", "score"])


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations during backward (`saliency.gradient_checkpointing`): less
    memory for about one more forward pass of time. Takes effect in `gradient_scores`."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@contextmanager
def _checkpointing_active(model: PreTrainedModel) -> Iterator[None]:
    """HF checkpoints a layer only while that layer's own `training` flag is set: set just those flags,
    so the model otherwise stays in eval mode (no dropout)."""
    layers = get_adapter(model.config).layers(model) if model.is_activation_checkpointing else []
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def gradient_scores(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, objective: Objective
) -> pd.DataFrame:
    """L1 sum over each unit of |w * G|, G the gradient of `objective` over the whole set: gradients
    only for prunable weights, micro-batches of `batch_size` windows (checkpointed if enabled).

    Leaves the model as it found it: no gradients, nothing trainable, same train/eval mode."""
    was_training = model.training
    model.eval().requires_grad_(False)
    scores = UnitSaliency(model)
    hooks = []
    for p in scores.owners:
        p.requires_grad_(True)
        p.grad = None
        hooks.append(p.register_post_accumulate_grad_hook(scores))
    device = next(model.parameters()).device
    starts = range(0, len(windows), batch_size)
    try:
        with _checkpointing_active(model):
            for start in tqdm(starts, desc="saliency", unit="batch", leave=False):
                scores.last = start == starts[-1]
                logits, labels = logits_and_labels(model, windows[start : start + batch_size].to(device))
                objective(logits, labels, len(windows)).backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False).train(was_training)
    return scores.table()


def score_table(model: PreTrainedModel, per_unit: Callable[[nn.Module, str], torch.Tensor]) -> pd.DataFrame:
    """One row per unit (layer, module, unit, score), `per_unit(layer, module)` giving a module's unit scores."""
    adapter = get_adapter(model.config)
    rows = []
    for index, layer in enumerate(adapter.layers(model)):
        for module in adapter.modules(layer):
            scores = per_unit(layer, module)
            rows += [(index, module, unit, float(s)) for unit, s in enumerate(scores.tolist())]
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score"])


def nirvana_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """One row per unit: layer, module, unit, score (L1 sum of |w * G| over the unit)."""
    return gradient_scores(model, windows, batch_size, ntk_objective)
