"""Pruning removes exactly what masking zeroes, FLAP's bias compensation holds the calibration mean, and
pruned folders reload as HF models."""

import copy

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import random_plan, tiny_llama
from nirvana.method.surgery import layer_units, prune_model, zero_model
from nirvana.models import GRANULARITY_KEY, get_adapter
from nirvana.models.widths import BIAS_KEY, CONFIG_KEY

TOKENS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_equals_dense_with_units_zeroed(kind: str, seed: int) -> None:
    dense = tiny_llama(kind, seed=seed)
    plan = random_plan(dense, seed=seed)
    zeroed, pruned = copy.deepcopy(dense), copy.deepcopy(dense)
    zero_model(zeroed, plan)
    prune_model(pruned, plan)
    assert pruned.num_parameters() < dense.num_parameters()
    assert not torch.allclose(logits(zeroed), logits(dense), atol=1e-3)  # the plan really bites
    torch.testing.assert_close(logits(pruned), logits(zeroed), atol=1e-5, rtol=0)


def test_pruned_widths_follow_the_plan() -> None:
    model = tiny_llama("gqa")
    plan = random_plan(model, seed=3)
    prune_model(model, plan)
    kept = plan[plan.keep].groupby(["layer", "module"]).size()
    assert layer_units(model) == [{"attn": kept[(i, "attn")], "mlp": kept[(i, "mlp")]} for i in range(2)]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == kept[(0, "attn")] * 3 * 4  # groups x n_rep x head_dim
    assert attn.k_proj.weight.shape == (kept[(0, "attn")] * 4, 24)
    assert getattr(model.config, CONFIG_KEY) == layer_units(model)


def test_save_then_load_gives_identical_logits(kind: str, tmp_path) -> None:
    model = tiny_llama(kind)
    prune_model(model, random_plan(model, seed=4))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert layer_units(loaded) == layer_units(model)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    out = loaded.generate(input_ids=TOKENS[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_load_rejects_a_config_with_the_wrong_layer_count(tmp_path) -> None:
    model = tiny_llama("gqa")
    prune_model(model, random_plan(model))
    setattr(model.config, CONFIG_KEY, layer_units(model)[:1])
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lists 1 layers, the model has 2"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: gemma3_text, llama, mistral, qwen2"):
        get_adapter(GPT2Config())


CALIBRATION = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(2))


def flap_plan(model: torch.nn.Module, sparsity: float = 0.4) -> pd.DataFrame:
    from nirvana.method.allocation import allocate_for_model
    from nirvana.method.criteria import flap_scores

    return allocate_for_model(model, flap_scores(model, CALIBRATION, 3), sparsity, 3.0, 1, "flap")


def test_compensated_projections_equal_the_dense_ones_at_the_calibration_mean(kind: str) -> None:
    dense = tiny_llama(kind)
    plan = flap_plan(dense)
    pruned = copy.deepcopy(dense)
    prune_model(pruned, plan)
    c = dense.config
    group = c.head_dim * c.num_attention_heads // c.num_key_value_heads
    gen = torch.Generator().manual_seed(3)
    for i in range(c.num_hidden_layers):
        for module, name, size in (("attn", "self_attn.o_proj", group), ("mlp", "mlp.down_proj", 1)):
            rows = plan[(plan.layer == i) & (plan.module == module)].sort_values("unit")
            assert not rows.keep.all(), "the plan must remove something here"
            x = torch.randn(5, len(rows) * size, generator=gen)
            kept = torch.tensor([u * size + j for u in rows.unit[rows.keep] for j in range(size)])
            at_mean = x.clone()
            for unit, mean in zip(rows.unit[~rows.keep], rows.input_mean[~rows.keep], strict=True):
                at_mean[:, unit * size : (unit + 1) * size] = torch.tensor(list(mean), dtype=torch.float32)
            full, small = dense.model.layers[i].get_submodule(name), pruned.model.layers[i].get_submodule(name)
            with torch.no_grad():
                torch.testing.assert_close(small(at_mean[:, kept]), full(at_mean), atol=1e-5, rtol=0)
                assert not torch.allclose(small(x[:, kept]), full(x), atol=1e-3)  # elsewhere it differs


def test_query_head_compensation_uses_each_heads_strided_columns() -> None:
    """Under query_head granularity a unit's o_proj columns are one head in every KV group: the bias
    must hold exactly those columns at their calibration mean (FLAP's mean of window means, by hand)."""
    dense = tiny_llama("gqa")  # 6 query heads, 2 KV groups of 3, head_dim 4
    setattr(dense.config, GRANULARITY_KEY, "query_head")
    inputs: list[torch.Tensor] = []
    hook = dense.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    with torch.no_grad():
        dense(input_ids=CALIBRATION)
    hook.remove()
    mean = torch.cat(inputs).mean(dim=1).mean(dim=0)  # per column: the mean of the windows' means
    plan = flap_plan(dense, sparsity=0.5)
    pruned = copy.deepcopy(dense)
    prune_model(pruned, plan)
    rows = plan[(plan.layer == 0) & (plan.module == "attn")]
    removed = rows.unit[~rows.keep].tolist()
    assert removed, "the plan must remove a head position in layer 0"
    c = dense.config
    group, dim = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    columns = {
        u: [g * group * dim + u * dim + j for g in range(c.num_key_value_heads) for j in range(dim)] for u in rows.unit
    }
    gone = [col for u in removed for col in columns[u]]
    kept = sorted(set(range(c.num_attention_heads * dim)) - set(gone))
    x = torch.randn(5, c.num_attention_heads * dim, generator=torch.Generator().manual_seed(4))
    x[:, gone] = mean[gone]
    full, small = dense.model.layers[0].self_attn.o_proj, pruned.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        torch.testing.assert_close(small(x[:, kept]), full(x), atol=1e-5, rtol=0)


def test_a_flap_pruned_model_reloads_with_its_biases(kind: str, tmp_path) -> None:
    model = tiny_llama(kind)
    plan = flap_plan(model)
    zeroed = copy.deepcopy(model)
    zero_model(zeroed, plan)
    prune_model(model, plan)
    torch.testing.assert_close(logits(model), logits(zeroed), atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, BIAS_KEY) is True and layer_units(loaded) == layer_units(model)
    for before, after in zip(model.model.layers, loaded.model.layers, strict=True):
        assert torch.equal(before.mlp.down_proj.bias, after.mlp.down_proj.bias)
        assert torch.count_nonzero(after.self_attn.o_proj.bias) > 0
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_plans_without_input_means_add_no_bias() -> None:
    model = tiny_llama("gqa")
    prune_model(model, random_plan(model, seed=5))
    assert all(layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None for layer in model.model.layers)
    assert not hasattr(model.config, BIAS_KEY)
