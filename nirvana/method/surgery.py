"""Physical removal of units: a plan's dropped units leave the weight matrices, the widths left go to
`config.json` (`nirvana.models.widths` says how a pruned folder loads back), and FLAP's bias compensation
folds the removed units' mean contribution into an output bias."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nirvana.core.io import atomic_path
from nirvana.models import Adapter, get_adapter
from nirvana.models.base import Slice, unit_rows
from nirvana.models.remote import add_remote_code
from nirvana.models.widths import BIAS_KEY, CONFIG_KEY


def layer_units(model: PreTrainedModel, *, adapter: Adapter | None = None) -> list[dict[str, int]]:
    """Current unit count per layer and module (`adapter`: the model's, if the caller holds it already)."""
    adapter = adapter or get_adapter(model.config)
    return [{m: adapter.unit_count(layer, m) for m in adapter.modules(layer)} for layer in adapter.layers(model)]


def units_by_layer(plan: pd.DataFrame, keep: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Sorted unit indices per layer and module whose `keep` column equals `keep`."""
    rows = plan[plan["keep"] == keep]
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer in sorted(plan["layer"].unique()):
        out[int(layer)] = {}
        for module in plan.loc[plan["layer"] == layer, "module"].unique():
            units = rows[(rows["layer"] == layer) & (rows["module"] == module)]["unit"]
            out[int(layer)][module] = torch.tensor(sorted(units.tolist()), dtype=torch.long)
    return out


def _removed_input_mean(
    plan: pd.DataFrame, layer: int, module: str, out: Slice, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input columns of the output projection (slice `out` of `count` units) that the plan removes in
    one layer and module, and their calibration means (float64), from the plan's `input_mean` lists
    (one per unit, in the column order `unit_rows` gives for that unit alone)."""
    rows = plan[(plan["layer"] == layer) & (plan["module"] == module) & ~plan["keep"]].sort_values("unit")
    if rows.empty:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    means = [torch.as_tensor(np.asarray(m, dtype=np.float64)) for m in rows["input_mean"]]
    columns = [unit_rows(torch.tensor([u]), out.size, out.groups, count) for u in rows["unit"].tolist()]
    return torch.cat(columns), torch.cat(means)


def compensate_bias(model: PreTrainedModel, plan: pd.DataFrame, *, adapter: Adapter) -> bool:
    """FLAP's bias compensation, if the plan carries `input_mean`: add W[:, removed] @ mean[removed] to
    the bias of every output projection (created if missing), so a removed column still contributes its
    calibration average. Must run before the columns go. Returns whether it did anything."""
    if "input_mean" not in plan.columns:
        return False
    with torch.no_grad():
        for index, layer in enumerate(adapter.layers(model)):
            adapter.add_output_bias(layer)
            for module in adapter.modules(layer):
                proj, out = adapter.output_projection(layer, module), adapter.output_slice(layer, module)
                count = adapter.unit_count(layer, module)
                columns, mean = _removed_input_mean(plan, index, module, out, count)
                assert proj.bias is not None
                w = proj.weight.detach()
                shift = w[:, columns.to(w.device)].double() @ mean.to(w.device)
                proj.bias.add_(shift.to(proj.bias.dtype))
    setattr(model.config, BIAS_KEY, True)
    return True


def prune_model(model: PreTrainedModel, plan: pd.DataFrame, *, adapter: Adapter | None = None) -> None:
    """Remove every unit whose plan row says keep=False (after bias compensation, if the plan asks for
    it), and record the widths in the config. `adapter`: the model's, derived once here if not given."""
    adapter = adapter or get_adapter(model.config)
    layers = adapter.layers(model)
    kept = units_by_layer(plan, keep=True)
    if sorted(kept) != list(range(len(layers))):
        raise ValueError(f"plan covers layers {sorted(kept)}, model has {len(layers)}")
    compensate_bias(model, plan, adapter=adapter)
    adapter.before_prune(model)
    for index, layer in enumerate(layers):
        adapter.prune_layer(layer, kept[index])
    setattr(model.config, CONFIG_KEY, layer_units(model, adapter=adapter))


def zero_model(model: PreTrainedModel, plan: pd.DataFrame, *, adapter: Adapter | None = None) -> None:
    """Zero the units the plan removes, keeping dense shapes (the reference for pruning)."""
    adapter = adapter or get_adapter(model.config)
    compensate_bias(model, plan, adapter=adapter)
    dropped = units_by_layer(plan, keep=False)
    for index, layer in enumerate(adapter.layers(model)):
        adapter.zero_units(layer, dropped[index])


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    card: Callable[[Path], str] | None = None,
) -> None:
    """Write an HF folder (safetensors + tokenizer; a pruned model's modeling file for loading without
    nirvana) atomically. `card(folder)` gives its README.md from the written files, so the card is in
    place before the folder appears."""
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        add_remote_code(tmp, model.config)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp))
