"""Llama-style decoder layers (grouped-query attention, gated MLP)."""

from __future__ import annotations

from torch import nn

from nirvana.models.base import Adapter, Slice


class LlamaAdapter(Adapter):
    """Attention unit = one KV group: its K and V heads, the n_rep query heads that share it
    (HF's repeat_kv makes them the contiguous q rows of the group) and those o_proj columns.
    MLP unit = one intermediate channel: gate and up rows, down column."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        layers = getattr(model, "model", model).layers
        assert isinstance(layers, nn.ModuleList)
        return layers

    def slices(self, module: str) -> list[Slice]:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        group = head_dim * (c.num_attention_heads // c.num_key_value_heads)
        if module == "attn":
            out = [
                Slice("self_attn.q_proj.weight", 0, group),
                Slice("self_attn.k_proj.weight", 0, head_dim),
                Slice("self_attn.v_proj.weight", 0, head_dim),
                Slice("self_attn.o_proj.weight", 1, group),
            ]
            if getattr(c, "attention_bias", False):
                out += [
                    Slice("self_attn.q_proj.bias", 0, group),
                    Slice("self_attn.k_proj.bias", 0, head_dim),
                    Slice("self_attn.v_proj.bias", 0, head_dim),
                ]
            return out
        out = [
            Slice("mlp.gate_proj.weight", 0, 1),
            Slice("mlp.up_proj.weight", 0, 1),
            Slice("mlp.down_proj.weight", 1, 1),
        ]
        if getattr(c, "mlp_bias", False):
            out += [Slice("mlp.gate_proj.bias", 0, 1), Slice("mlp.up_proj.bias", 0, 1)]
        return out
