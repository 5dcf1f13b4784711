"""Pruned widths in a config: `nirvana_units` (one `{"attn": kv_groups, "mlp": channels}` per layer) and
`nirvana_output_bias: true` when FLAP's bias compensation gave the output projections a bias. `register()`
wraps `PreTrainedModel.post_init` so that a model built from such a config shrinks its layers (and adds those
biases) before the weights load; `from_pretrained` of a pruned folder then just works."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nirvana.models import get_adapter

if TYPE_CHECKING:  # transformers' modeling code takes seconds to import: register() imports it when called
    from transformers import PreTrainedModel

CONFIG_KEY = "nirvana_units"
BIAS_KEY = "nirvana_output_bias"
_original_post_init: Callable[[PreTrainedModel], None] | None = None


def _post_init(self: PreTrainedModel) -> None:
    """Shrink a model built from a pruned config to its recorded widths and give it the output biases
    bias compensation added, then carry on."""
    units = getattr(self.config, CONFIG_KEY, None)
    output_bias = getattr(self.config, BIAS_KEY, False)
    if units or output_bias:
        adapter = get_adapter(self.config)
        layers = adapter.find_layers(self)
        if layers is not None:
            if units:
                if len(units) != len(layers):
                    raise ValueError(f"config {CONFIG_KEY} lists {len(units)} layers, the model has {len(layers)}")
                for layer, counts in zip(layers, units, strict=True):
                    adapter.resize_layer(layer, counts)
            if output_bias:
                for layer in layers:
                    adapter.add_output_bias(layer)
    assert _original_post_init is not None
    _original_post_init(self)


def register() -> None:
    """Teach transformers to build pruned models (idempotent; `nirvana.register()` runs it, and so does every
    loader in `nirvana.models.loading`)."""
    global _original_post_init
    from transformers import PreTrainedModel

    if _original_post_init is None:
        _original_post_init = PreTrainedModel.post_init
    PreTrainedModel.post_init = _post_init  # type: ignore[method-assign]
