"""Physical removal of units, and loading pruned folders as ordinary Hugging Face models.

A pruned model's per-layer widths live in `config.json` under `nirvana_units` (one
`{"attn": kv_groups, "mlp": channels}` per layer). `import nirvana` wraps
`PreTrainedModel.post_init` so that any model built from such a config shrinks its layers
before the weights load; `AutoModelForCausalLM.from_pretrained` then just works.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nirvana.io import atomic_path
from nirvana.models import MODULES, get_adapter

CONFIG_KEY = "nirvana_units"


def layer_units(model: PreTrainedModel) -> list[dict[str, int]]:
    """Current unit count per layer and module."""
    adapter = get_adapter(model.config)
    return [{m: adapter.unit_count(layer, m) for m in MODULES} for layer in adapter.layers(model)]


def units_by_layer(plan: pd.DataFrame, keep: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Sorted unit indices per layer and module whose `keep` column equals `keep`."""
    rows = plan[plan["keep"] == keep]
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer in sorted(plan["layer"].unique()):
        out[int(layer)] = {}
        for module in MODULES:
            units = rows[(rows["layer"] == layer) & (rows["module"] == module)]["unit"]
            out[int(layer)][module] = torch.tensor(sorted(units.tolist()), dtype=torch.long)
    return out


def prune_model(model: PreTrainedModel, plan: pd.DataFrame) -> None:
    """Remove every unit whose plan row says keep=False, and record the widths in the config."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    kept = units_by_layer(plan, keep=True)
    if sorted(kept) != list(range(len(layers))):
        raise ValueError(f"plan covers layers {sorted(kept)}, model has {len(layers)}")
    for index, layer in enumerate(layers):
        adapter.prune_layer(layer, kept[index])
    setattr(model.config, CONFIG_KEY, layer_units(model))


def zero_model(model: PreTrainedModel, plan: pd.DataFrame) -> None:
    """Zero the units the plan removes, keeping dense shapes (the reference for pruning)."""
    adapter = get_adapter(model.config)
    dropped = units_by_layer(plan, keep=False)
    for index, layer in enumerate(adapter.layers(model)):
        adapter.zero_units(layer, dropped[index])


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write an HF folder (safetensors + tokenizer) atomically."""
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


_original_post_init = PreTrainedModel.post_init


def _post_init(self: PreTrainedModel) -> None:
    """Shrink a model built from a pruned config to its recorded widths, then carry on."""
    units = getattr(self.config, CONFIG_KEY, None)
    layers = getattr(self, "layers", None)
    if units and isinstance(layers, nn.ModuleList):
        if len(units) != len(layers):
            raise ValueError(f"config {CONFIG_KEY} lists {len(units)} layers, the model has {len(layers)}")
        adapter = get_adapter(self.config)
        for layer, counts in zip(layers, units, strict=True):
            adapter.resize_layer(layer, counts)
    _original_post_init(self)


def register() -> None:
    """Teach transformers to build pruned models (idempotent; run by `import nirvana`)."""
    PreTrainedModel.post_init = _post_init  # type: ignore[method-assign]
