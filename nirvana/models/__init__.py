"""Architectures: the adapters (`base`, `llama`, `t5`), the only model-specific code, naming each layer's
prunable units; loading models and reading model folders (`loading`); how a pruned config's widths build
the model (`widths`); and the self-contained remote code copied into pruned folders (`modeling_nirvana`,
`remote`), which mirrors the adapters. A new architecture is one adapter file, registered in `ADAPTERS`.

May import: nirvana.core.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from nirvana.core.errors import InputError
from nirvana.models.base import GRANULARITIES, GRANULARITY_KEY, MODULES, Adapter, Slice, pool
from nirvana.models.llama import LlamaAdapter, Qwen2Adapter
from nirvana.models.t5 import T5Adapter

ADAPTERS: dict[str, type[Adapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,  # the same layout; sliding-window attention needs nothing of ours
    "qwen2": Qwen2Adapter,
    "gemma3_text": LlamaAdapter,  # q_norm/k_norm act per head over head_dim, shared by every head
    "t5": T5Adapter,
}

__all__ = ["ADAPTERS", "GRANULARITIES", "GRANULARITY_KEY", "MODULES", "Adapter", "Slice", "get_adapter", "pool"]


def get_adapter(config: PretrainedConfig) -> Adapter:
    """The adapter for this config's model_type, or an InputError naming the model and the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        model = getattr(config, "name_or_path", "") or "the model"
        raise InputError(f"{model}: model_type {model_type!r} is not supported; supported: {supported}")
    return ADAPTERS[model_type](config)
