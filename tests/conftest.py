"""Tiny random Llama models (multi-head and grouped-query) and helpers shared by the tests."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nirvana  # noqa: F401  (registers pruned-model loading)

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "gqa_bias": dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True, mlp_bias=True),
}


def tiny_llama(kind: str = "gqa", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama with distinct weights everywhere (biases included)."""
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        head_dim=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **SHAPES[kind],
    )
    config = LlamaConfig(**{**shape, **overrides})
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    return model


def random_plan(model: LlamaForCausalLM, seed: int = 0, drop: float = 0.4) -> pd.DataFrame:
    """A plan that drops a random share of units, always keeping one unit per layer and module."""
    from nirvana.models import get_adapter

    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for index, layer in enumerate(adapter.layers(model)):
        for module in adapter.modules(layer):
            n = adapter.unit_count(layer, module)
            keep = torch.rand(n, generator=gen) > drop
            keep[torch.randint(n, (1,), generator=gen)] = True
            rows += [(index, module, u, 0.0, bool(k)) for u, k in enumerate(keep.tolist())]
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score", "keep"])


@pytest.fixture(params=sorted(SHAPES))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


WORDS = [f"w{i}" for i in range(62)]


def tiny_model_dir(path, kind: str = "gqa"):
    """A saved tiny Llama with a word-level tokenizer over its 64-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {w: i + 1 for i, w in enumerate(WORDS)} | {"</s>": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_llama(kind).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return path


def random_text(words: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen).tolist())
