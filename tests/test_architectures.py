"""Every supported architecture, at every attention granularity: pruning equals masking, and a
pruned folder reloads as a plain Hugging Face model with identical logits."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DECODERS, random_plan, tiny_decoder, tiny_t5
from nirvana.method.surgery import layer_units, prune_model, zero_model
from nirvana.models import get_adapter

TOKENS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


CASES = [(t, g) for t in DECODERS for g in ("group", "query_head")]


@pytest.mark.parametrize(("model_type", "granularity"), CASES)
def test_pruned_equals_masked_and_reloads(model_type: str, granularity: str, tmp_path) -> None:
    dense = tiny_decoder(model_type, granularity)
    plan = random_plan(dense, seed=2, drop=0.5)
    zeroed, pruned = copy.deepcopy(dense), copy.deepcopy(dense)
    zero_model(zeroed, plan)
    prune_model(pruned, plan)
    assert pruned.num_parameters() < dense.num_parameters()
    assert not torch.allclose(logits(zeroed), logits(dense), atol=1e-3)  # the plan really bites
    torch.testing.assert_close(logits(pruned), logits(zeroed), atol=1e-5, rtol=0)

    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert layer_units(loaded) == layer_units(pruned)
    torch.testing.assert_close(logits(loaded), logits(pruned), atol=0, rtol=0)
    out = loaded.generate(input_ids=TOKENS[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_query_head_granularity_keeps_kv_heads_and_equal_groups() -> None:
    model = tiny_decoder("llama", "query_head")
    adapter = get_adapter(model.config)
    assert [adapter.unit_count(layer, "attn") for layer in adapter.layers(model)] == [3, 3, 3]  # n_rep
    plan = random_plan(model, seed=5, drop=0.5)
    prune_model(model, plan)
    for index, layer in enumerate(adapter.layers(model)):
        attn = layer.self_attn
        kept = int(plan[(plan.layer == index) & (plan.module == "attn") & plan.keep].shape[0])
        assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * 4  # both KV heads stay
        assert attn.q_proj.out_features == 2 * kept * 4  # every group keeps `kept` query heads
        assert attn.num_key_value_groups == kept


def test_query_head_rows_are_strided_across_groups() -> None:
    """Unit j of a layer is query head j of every KV group: heads j, n_rep + j, ... in HF's layout."""
    model = tiny_decoder("llama", "query_head")
    adapter = get_adapter(model.config)
    layer = adapter.layers(model)[0]
    q = layer.self_attn.q_proj.weight.detach().clone()
    adapter.prune_layer(layer, {"attn": torch.tensor([1]), "mlp": torch.arange(40)})
    heads = q.view(6, 4, 24)  # 2 groups x 3 query heads, head_dim 4
    torch.testing.assert_close(layer.self_attn.q_proj.weight, torch.cat([heads[1], heads[4]]))


def test_qwen2_biases_follow_their_rows() -> None:
    model = tiny_decoder("qwen2", "group")
    adapter = get_adapter(model.config)
    layer = adapter.layers(model)[0]
    bias = layer.self_attn.k_proj.bias.detach().clone()
    adapter.prune_layer(layer, {"attn": torch.tensor([0, 2]), "mlp": torch.arange(40)})
    torch.testing.assert_close(layer.self_attn.k_proj.bias, torch.cat([bias[0:4], bias[8:12]]))
    assert layer.self_attn.q_proj.bias.shape == (2 * 2 * 4,)


def test_unknown_granularity_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"attention.granularity 'head' is not one of group, query_head"):
        get_adapter(tiny_decoder("llama", "head").config)


def t5_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS, decoder_input_ids=TOKENS[:, :7].flip(1)).logits


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_t5_pruned_equals_masked_and_reloads(feed_forward: str, tmp_path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    dense = tiny_t5(feed_forward)
    adapter = get_adapter(dense.config)
    assert [adapter.modules(layer) for layer in adapter.layers(dense)] == [("attn", "mlp")] * 3 + [
        ("attn", "cross", "mlp")
    ] * 2
    plan = random_plan(dense, seed=3, drop=0.5)
    zeroed, pruned = copy.deepcopy(dense), copy.deepcopy(dense)
    zero_model(zeroed, plan)
    prune_model(pruned, plan)
    assert pruned.num_parameters() < dense.num_parameters()
    assert not torch.allclose(t5_logits(zeroed), t5_logits(dense), atol=1e-3)
    torch.testing.assert_close(t5_logits(pruned), t5_logits(zeroed), atol=1e-5, rtol=0)

    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert layer_units(loaded) == layer_units(pruned)
    torch.testing.assert_close(t5_logits(loaded), t5_logits(pruned), atol=0, rtol=0)
    out = loaded.generate(input_ids=TOKENS[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    reference = pruned.generate(input_ids=TOKENS[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, reference)


def test_t5_blocks_keep_the_position_bias_of_their_own_heads() -> None:
    """After pruning, block b's bias table holds the stack's original columns of the heads b keeps."""
    model = tiny_t5("relu")
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().clone()
    plan = random_plan(model, seed=7, drop=0.5)
    prune_model(model, plan)
    for index, block in enumerate(model.encoder.block):
        kept = plan[(plan.layer == index) & (plan.module == "attn") & plan.keep].unit.sort_values().tolist()
        own = block.layer[0].SelfAttention.relative_attention_bias.weight
        torch.testing.assert_close(own, table[:, kept])
        assert block.layer[0].SelfAttention.n_heads == len(kept)
