"""Llama-style decoder layers (grouped-query attention, gated MLP): Llama, Mistral, Qwen2, Gemma 3."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PretrainedConfig

from nirvana.core.errors import InputError
from nirvana.models.base import ATTENTION, Adapter, Slice


def head_dim(config: PretrainedConfig) -> int:
    """Per-head width; pruning removes whole heads, never part of one."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class LlamaAdapter(Adapter):
    """Attention unit = one KV group: its K and V heads, the n_rep query heads that share it
    (HF's repeat_kv makes them the contiguous q rows of the group) and those o_proj columns.
    With granularity "query_head": one query head position in every group (its q rows and o_proj
    columns), K and V kept, so every group keeps the same number of query heads.
    MLP unit = one intermediate channel: gate and up rows, down column."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if self.granularity == "query_head" and heads == kv_heads:
            model = config.name_or_path or "the model"
            raise InputError(
                f"attention.granularity = 'query_head' needs grouped-query attention; {model} has none ({heads} "
                f"query heads, {kv_heads} KV heads): use attention.granularity = 'group'"
            )

    def find_layers(self, model: nn.Module) -> list[nn.Module] | None:
        layers = getattr(model, "layers", None) or getattr(getattr(model, "model", None), "layers", None)
        return list(layers) if isinstance(layers, nn.ModuleList) else None

    def attention_bias(self) -> bool:
        return bool(getattr(self.config, "attention_bias", False))

    def attention_slices(self) -> list[Slice]:
        c, dim = self.config, head_dim(self.config)
        if self.granularity == "query_head":
            q = Slice("self_attn.q_proj.{}", 0, dim, groups=c.num_key_value_heads)
            slices = [q, Slice("self_attn.o_proj.weight", 1, dim, groups=c.num_key_value_heads)]
            biased = [q]
        else:
            group = dim * (c.num_attention_heads // c.num_key_value_heads)
            q = Slice("self_attn.q_proj.{}", 0, group)
            k, v = Slice("self_attn.k_proj.{}", 0, dim), Slice("self_attn.v_proj.{}", 0, dim)
            slices = [q, k, v, Slice("self_attn.o_proj.weight", 1, group)]
            biased = [q, k, v]
        weights = [Slice(s.param.format("weight"), s.dim, s.size, s.groups) for s in slices]
        if not self.attention_bias():
            return weights
        return weights + [Slice(s.param.format("bias"), s.dim, s.size, s.groups) for s in biased]

    def slices(self, layer: nn.Module, module: str) -> list[Slice]:
        if module == ATTENTION:
            return self.attention_slices()
        out = [
            Slice("mlp.gate_proj.weight", 0, 1),
            Slice("mlp.up_proj.weight", 0, 1),
            Slice("mlp.down_proj.weight", 1, 1),
        ]
        if getattr(self.config, "mlp_bias", False):
            out += [Slice("mlp.gate_proj.bias", 0, 1), Slice("mlp.up_proj.bias", 0, 1)]
        return out

    def after_resize(self, layer: nn.Module) -> None:
        """Query heads per KV head, which repeat_kv reads, follow the kept query heads."""
        attn: Any = layer.get_submodule("self_attn")
        attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: Llama's layout with q/k/v biases always on (they follow their rows)."""

    def attention_bias(self) -> bool:
        return True
