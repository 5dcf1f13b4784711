"""Pruned models from the NIRVANA pipeline, for transformers without the `nirvana` package.

A pruned folder's config.json keeps the stock `model_type` and adds the per-layer widths that pruning
left (`nirvana_units`: one `{"attn": units, "mlp": channels}` per layer, plus `"cross"` in T5 decoder
blocks), the attention unit (`nirvana_granularity`: "group", a whole KV group, or "query_head", one
query head in every group), and `nirvana_output_bias` when bias compensation gave each output
projection a bias. Each class below is the stock one, shrunk to those widths before the weights load.
`auto_map` in config.json names the class, so `from_pretrained(folder, trust_remote_code=True)` works.

This file imports only torch and transformers; the `nirvana` package ships it into every pruned folder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2ForCausalLM,
    T5ForConditionalGeneration,
)

UNITS_KEY = "nirvana_units"
BIAS_KEY = "nirvana_output_bias"
GRANULARITY_KEY = "nirvana_granularity"


def shrink_linear(linear: nn.Linear, rows: int | None = None, columns: int | None = None) -> None:
    """Keep the first `rows` outputs and `columns` inputs: only shapes matter, the weights load afterwards."""
    rows = linear.out_features if rows is None else rows
    columns = linear.in_features if columns is None else columns
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach()[:rows, :columns].clone(), weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[:rows].clone(), linear.bias.requires_grad)
    linear.out_features, linear.in_features = rows, columns


def add_bias(linear: nn.Linear) -> None:
    """Give an output projection the zero bias that bias compensation's saved values load into."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)


def layer_widths(config: PretrainedConfig, layers: int) -> list[dict[str, int]] | None:
    """The recorded widths, checked against the model's layer count (None for a dense config)."""
    units = getattr(config, UNITS_KEY, None)
    if units and len(units) != layers:
        raise ValueError(f"config {UNITS_KEY} lists {len(units)} layers, the model has {layers}")
    return units or None


def shrink_decoder(layers: nn.ModuleList, config: PretrainedConfig) -> None:
    """Shrink Llama-style layers (Llama, Mistral, Qwen2, Gemma 3) to their recorded widths."""
    widths = layer_widths(config, len(layers))
    query_head = getattr(config, GRANULARITY_KEY, None) == "query_head"
    for index, layer in enumerate(layers):
        attn: Any = layer.self_attn
        mlp: Any = layer.mlp
        if widths is not None:
            counts, head_dim = widths[index], attn.head_dim
            kv_heads = config.num_key_value_heads
            if query_head:  # every KV group keeps counts["attn"] query heads; K and V stay whole
                queries = kv_heads * counts["attn"]
            else:  # counts["attn"] whole KV groups, each with its query heads
                queries = counts["attn"] * (config.num_attention_heads // kv_heads)
                kv_heads = counts["attn"]
                shrink_linear(attn.k_proj, rows=kv_heads * head_dim)
                shrink_linear(attn.v_proj, rows=kv_heads * head_dim)
            shrink_linear(attn.q_proj, rows=queries * head_dim)
            shrink_linear(attn.o_proj, columns=queries * head_dim)
            attn.num_key_value_groups = queries // kv_heads  # what repeat_kv reads
            shrink_linear(mlp.gate_proj, rows=counts["mlp"])
            shrink_linear(mlp.up_proj, rows=counts["mlp"])
            shrink_linear(mlp.down_proj, columns=counts["mlp"])
        if getattr(config, BIAS_KEY, False):
            add_bias(attn.o_proj)
            add_bias(mlp.down_proj)


class NirvanaLlamaForCausalLM(LlamaForCausalLM):
    """A pruned Llama."""

    def post_init(self) -> None:
        shrink_decoder(self.model.layers, self.config)
        super().post_init()


class NirvanaMistralForCausalLM(MistralForCausalLM):
    """A pruned Mistral."""

    def post_init(self) -> None:
        shrink_decoder(self.model.layers, self.config)
        super().post_init()


class NirvanaQwen2ForCausalLM(Qwen2ForCausalLM):
    """A pruned Qwen2 (its q, k and v biases follow their rows)."""

    def post_init(self) -> None:
        shrink_decoder(self.model.layers, self.config)
        super().post_init()


class NirvanaGemma3ForCausalLM(Gemma3ForCausalLM):
    """A pruned Gemma 3 text model (q_norm and k_norm act per head, so they need nothing)."""

    def post_init(self) -> None:
        shrink_decoder(self.model.layers, self.config)
        super().post_init()


# --- T5 ------------------------------------------------------------------------------------------


def _drop_incoming_bias(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A pruned attention builds its own position bias (its own heads' table, or zeros for
    cross-attention) instead of taking block 0's, whose heads are other heads."""
    return args, {**kwargs, "position_bias": None}


def shrink_t5_attention(attn: Any, heads: int, self_attention: bool, config: PretrainedConfig) -> None:
    """Keep `heads` heads; self-attention gets its own relative position bias table for them."""
    width = heads * config.d_kv
    for linear in (attn.q, attn.k, attn.v):
        shrink_linear(linear, rows=width)
    shrink_linear(attn.o, columns=width)
    attn.n_heads, attn.inner_dim = heads, width
    if self_attention:
        attn.has_relative_attention_bias = True
        attn.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, heads)
    if not getattr(attn, "nirvana_own_bias", False):
        attn.register_forward_pre_hook(_drop_incoming_bias, with_kwargs=True)
        attn.nirvana_own_bias = True


def shrink_t5(model: T5ForConditionalGeneration) -> None:
    """Shrink every block (encoder's, then decoder's) to its recorded widths and output biases."""
    blocks: list[Any] = [*model.encoder.block, *model.decoder.block]
    widths = layer_widths(model.config, len(blocks))
    output_bias = getattr(model.config, BIAS_KEY, False)
    for index, block in enumerate(blocks):
        attentions = [block.layer[0].SelfAttention] + ([block.layer[1].EncDecAttention] if block.is_decoder else [])
        mlp = block.layer[-1].DenseReluDense
        if widths is not None:
            counts = widths[index]
            for attn, module in zip(attentions, ("attn", "cross"), strict=False):
                shrink_t5_attention(attn, counts[module], module == "attn", model.config)
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(mlp, name):
                    shrink_linear(getattr(mlp, name), rows=counts["mlp"])
            shrink_linear(mlp.wo, columns=counts["mlp"])
        if output_bias:
            for attn in attentions:
                add_bias(attn.o)
            add_bias(mlp.wo)


class NirvanaT5ForConditionalGeneration(T5ForConditionalGeneration):
    """A pruned T5: each block has its own head counts and its own relative position bias table."""

    def post_init(self) -> None:
        shrink_t5(self)
        super().post_init()
