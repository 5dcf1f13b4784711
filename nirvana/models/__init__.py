"""Architecture adapters: the only model-specific code, naming each layer's prunable units."""

from __future__ import annotations

from transformers import PretrainedConfig

from nirvana.models.base import MODULES, Adapter, Slice
from nirvana.models.llama import LlamaAdapter

ADAPTERS: dict[str, type[Adapter]] = {"llama": LlamaAdapter}

__all__ = ["ADAPTERS", "MODULES", "Adapter", "Slice", "get_adapter"]


def get_adapter(config: PretrainedConfig) -> Adapter:
    """The adapter for this config's model_type, or a clear error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {supported}")
    return ADAPTERS[model_type](config)
