"""T5 encoder-decoder blocks: encoder self-attention, decoder self- and cross-attention, dense or
gated-GELU feed-forward. Both stacks are pruned, encoder blocks first, then decoder blocks."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from nirvana.core.errors import InputError
from nirvana.models.base import ATTENTION, MLP, Adapter, Slice

CROSS = "cross"
ROLES = {ATTENTION: "SelfAttention", CROSS: "EncDecAttention"}


def _drop_incoming_bias(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Make a pruned attention build its own position bias instead of the previous block's, whose
    heads are other heads: its own relative-bias columns for self-attention, zeros for cross-attention."""
    return args, {**kwargs, "position_bias": None}


class T5Adapter(Adapter):
    """Attention unit = one head (q, k, v rows and o columns of d_kv each), in self- and cross-attention
    alike; MLP unit = one d_ff channel (wi or wi_0 and wi_1 rows, wo column).

    T5 computes the relative position bias once per stack, in block 0, for all of its heads, and hands
    it to every later block. Once blocks keep different heads, each block gets its own copy of the
    bias columns of the heads it keeps (block 0's table, sliced), so kept heads see the same bias."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        if self.granularity != "group":
            raise InputError("attention.granularity query_head needs grouped-query attention; T5 has none")

    def find_layers(self, model: nn.Module) -> list[nn.Module] | None:
        encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
        if encoder is None or decoder is None:
            return None
        return [*encoder.block, *decoder.block]

    def modules(self, layer: nn.Module) -> tuple[str, ...]:
        return (ATTENTION, CROSS, MLP) if layer.is_decoder else (ATTENTION, MLP)

    def slices(self, layer: nn.Module, module: str) -> list[Slice]:
        d_kv = self.config.d_kv
        if module in ROLES:
            index = 0 if module == ATTENTION else 1
            prefix = f"layer.{index}.{ROLES[module]}"
            rows = [Slice(f"{prefix}.{name}.weight", 0, d_kv) for name in ("q", "k", "v")]
            return [*rows, Slice(f"{prefix}.o.weight", 1, d_kv)]
        prefix = f"layer.{2 if layer.is_decoder else 1}.DenseReluDense"
        inputs = ("wi_0", "wi_1") if self.config.is_gated_act else ("wi",)
        return [*(Slice(f"{prefix}.{name}.weight", 0, 1) for name in inputs), Slice(f"{prefix}.wo.weight", 1, 1)]

    def attention(self, layer: nn.Module, module: str) -> Any:  # a T5Attention; typed loosely to set its fields
        return layer.get_submodule(f"layer.{0 if module == ATTENTION else 1}.{ROLES[module]}")

    def before_prune(self, model: nn.Module) -> None:
        """Give every block its own copy of its stack's relative position bias table (all heads)."""
        stacks: list[Any] = [model.encoder, model.decoder]
        for stack in stacks:
            table = stack.block[0].layer[0].SelfAttention.relative_attention_bias
            for block in stack.block[1:]:
                attn = block.layer[0].SelfAttention
                attn.has_relative_attention_bias = True
                attn.relative_attention_bias = copy.deepcopy(table)

    def prune_layer(self, layer: nn.Module, keep: dict) -> None:
        """Remove heads and channels, and the removed heads' columns of the block's own bias table."""
        attn = self.attention(layer, ATTENTION)
        if not attn.has_relative_attention_bias:  # a block rebuilt from a pruned config
            attn.has_relative_attention_bias = True
            attn.relative_attention_bias = nn.Embedding(self.config.relative_attention_num_buckets, attn.n_heads)
        table = attn.relative_attention_bias
        table.weight = nn.Parameter(table.weight.detach()[:, keep[ATTENTION].to(table.weight.device)].clone())
        table.embedding_dim = table.weight.shape[1]
        super().prune_layer(layer, keep)

    def resize_layer(self, layer: nn.Module, counts: dict[str, int]) -> None:
        """Always rebuild: even a block that keeps every head needs its own bias table and hook."""
        self.prune_layer(layer, {m: torch.arange(counts[m]) for m in self.modules(layer)})

    def after_resize(self, layer: nn.Module) -> None:
        """Head counts follow the kept heads; each attention builds its own position bias."""
        for module in self.modules(layer):
            if module == MLP:
                continue
            attn = self.attention(layer, module)
            attn.n_heads = attn.q.out_features // self.config.d_kv
            attn.inner_dim = attn.q.out_features
            if not getattr(attn, "nirvana_own_bias", False):
                attn.register_forward_pre_hook(_drop_incoming_bias, with_kwargs=True)
                attn.nirvana_own_bias = True
