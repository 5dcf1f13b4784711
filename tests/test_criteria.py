"""Every criterion equals its formula computed independently, covers every unit once, leaves the model
alone, and every method x allocation mode removes the same parameter budget; a new criterion needs only its
scoring function and its registration."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel

from conftest import tiny_decoder, tiny_llama
from nirvana.core.params import METHODS, AllocationParams, Params, defaults
from nirvana.evaluation.perplexity import param_counts
from nirvana.method.allocation import allocate_for_model, allocation_mode
from nirvana.method.criteria import (
    CRITERIA,
    flap_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
    wanda_sp_scores,
    wanda_sp_sequential,
)
from nirvana.method.plan import plan_for
from nirvana.method.saliency import score_table
from nirvana.method.surgery import prune_model, zero_model
from nirvana.models import get_adapter
from nirvana.models.base import unit_rows

WINDOWS = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(7))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

PerWeight = Callable[[int, str, str], torch.Tensor]
"""(layer, linear name, "weight" or "bias") -> a score per element of that parameter."""


def expected_units(model: LlamaForCausalLM, per_weight: PerWeight) -> dict[tuple[int, str, int], float]:
    """Per-element scores summed over hand-listed unit members (rows of q/k/v/gate/up and their biases,
    columns of o_proj/down_proj), in float64."""
    c = model.config
    d, n_rep = c.head_dim, c.num_attention_heads // c.num_key_value_heads
    out = {}
    for index in range(c.num_hidden_layers):

        def s(name: str, kind: str = "weight", i: int = index) -> torch.Tensor:
            return per_weight(i, name, kind).double()

        for g in range(c.num_key_value_heads):
            q, kv = slice(g * n_rep * d, (g + 1) * n_rep * d), slice(g * d, (g + 1) * d)
            total = s("self_attn.q_proj")[q].sum() + s("self_attn.o_proj")[:, q].sum()
            total += s("self_attn.k_proj")[kv].sum() + s("self_attn.v_proj")[kv].sum()
            if c.attention_bias:
                total += s("self_attn.q_proj", "bias")[q].sum()
                total += s("self_attn.k_proj", "bias")[kv].sum() + s("self_attn.v_proj", "bias")[kv].sum()
            out[(index, "attn", g)] = total.item()
        for ch in range(c.intermediate_size):
            total = s("mlp.gate_proj")[ch].sum() + s("mlp.up_proj")[ch].sum() + s("mlp.down_proj")[:, ch].sum()
            if c.mlp_bias:
                total += s("mlp.gate_proj", "bias")[ch] + s("mlp.up_proj", "bias")[ch]
            out[(index, "mlp", ch)] = total.item()
    return out


def param(model: LlamaForCausalLM, layer: int, name: str, kind: str) -> torch.Tensor:
    return getattr(model.model.layers[layer].get_submodule(name), kind).detach().double()


def assert_scores(
    table: pd.DataFrame, expected: dict[tuple[int, str, int], float], rtol: float = 1e-5, atol: float = 1e-9
) -> None:
    got = {(r.layer, r.module, r.unit): r.score for r in table.itertuples()}
    assert got.keys() == expected.keys() and len(table) == len(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=atol), key


@torch.no_grad()
def linear_inputs(model: LlamaForCausalLM, windows: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Every token's input to every projection (tokens x columns, float64), from one full-batch forward.

    q/k/v and gate/up inputs are the two RMSNorm outputs; the down_proj input is recomputed by hand
    as act(gate x) * up x; the o_proj input (attention itself) is taken with a hook."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def keep(name: str, output: bool, i: int = i) -> Callable:
            def hook(module: nn.Module, args: tuple, out: torch.Tensor | None = None) -> None:
                seen[(i, name)] = (out if output else args[0]).flatten(0, -2).double()

            return hook

        hooks.append(layer.input_layernorm.register_forward_hook(keep("attn_in", True)))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep("mlp_in", True)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep("o_in", False)))
    model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        m, x = layer.mlp, seen[(i, "mlp_in")]
        gate = x @ m.gate_proj.weight.double().T + (0 if m.gate_proj.bias is None else m.gate_proj.bias.double())
        up = x @ m.up_proj.weight.double().T + (0 if m.up_proj.bias is None else m.up_proj.bias.double())
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            inputs[(i, name)] = seen[(i, "attn_in")]
        inputs[(i, "mlp.gate_proj")] = inputs[(i, "mlp.up_proj")] = x
        inputs[(i, "self_attn.o_proj")] = seen[(i, "o_in")]
        inputs[(i, "mlp.down_proj")] = torch.nn.functional.silu(gate) * up
    return inputs


def test_magnitude_is_the_sum_of_absolute_weights(kind: str) -> None:
    model = tiny_llama(kind)
    expected = expected_units(model, lambda i, name, kind_: param(model, i, name, kind_).abs())
    assert_scores(magnitude_scores(model, WINDOWS, 2), expected)


@pytest.mark.parametrize("batch_size", [2, 5])
def test_taylor_matches_the_autograd_gradient_of_the_mean_lm_loss(kind: str, batch_size: int) -> None:
    model = tiny_llama(kind)
    names = [(i, n, k) for i in range(2) for n in LINEARS for k in ("weight", "bias")]
    params = {key: getattr(model.model.layers[key[0]].get_submodule(key[1]), key[2]) for key in names}
    params = {key: p for key, p in params.items() if p is not None}
    loss = model(input_ids=WINDOWS, labels=WINDOWS).loss  # HF's mean next-token cross-entropy, full batch
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    expected = expected_units(model, lambda i, n, k: (params[(i, n, k)].detach() * grads[(i, n, k)]).abs())
    assert_scores(taylor_scores(model, WINDOWS, batch_size), expected)


OUTPUTS = (("attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))


def unit_size(model: LlamaForCausalLM, module: str) -> int:
    """Output-projection columns per unit: a KV group's query heads x head_dim, or one MLP channel."""
    c = model.config
    return c.head_dim * c.num_attention_heads // c.num_key_value_heads if module == "attn" else 1


def wanda_sp_by_hand(model: LlamaForCausalLM, windows: torch.Tensor, layers: range) -> dict:
    """FLAP's prune_wanda_sp: column j of o_proj / down_proj scores mean_i |W_ij| * ||x_j||, a unit the
    sum over its columns (q/k/v and gate/up do not enter)."""
    inputs, expected = linear_inputs(model, windows), {}
    for i in layers:
        for module, name in OUTPUTS:
            column = param(model, i, name, "weight").abs().mean(dim=0) * inputs[(i, name)].norm(dim=0)
            for unit, total in enumerate(column.view(-1, unit_size(model, module)).sum(dim=1)):
                expected[(i, module, unit)] = total.item()
    return expected


@pytest.mark.parametrize("batch_size", [1, 3])
def test_wanda_sp_scores_output_columns_by_mean_weight_times_input_norm(kind: str, batch_size: int) -> None:
    model = tiny_llama(kind)
    assert_scores(wanda_sp_scores(model, WINDOWS, batch_size), wanda_sp_by_hand(model, WINDOWS, range(2)))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_wanda_sp_scores_each_layer_after_the_earlier_layers_are_pruned(kind: str, batch_size: int) -> None:
    """Layer 0 is scored on the dense model; layer 1 on the model whose layer 0 lost its lowest units:
    scores and plan equal a by-hand recomputation on that masked model, and differ from the dense
    model's layer-1 scores."""
    model = tiny_llama(kind)
    remove = {"attn": 1, "mlp": 15}
    plan = wanda_sp_sequential(copy.deepcopy(model), WINDOWS, batch_size, remove)
    dense = wanda_sp_by_hand(model, WINDOWS, range(2))
    masked = copy.deepcopy(model)
    for module, name in OUTPUTS:  # zeroing a unit's o_proj / down_proj columns removes it exactly
        layer0 = {u: dense[(0, m, u)] for (i, m, u) in dense if (i, m) == (0, module)}
        size = unit_size(model, module)
        with torch.no_grad():
            for unit in sorted(layer0, key=layer0.get)[: remove[module]]:
                masked.model.layers[0].get_submodule(name).weight[:, unit * size : (unit + 1) * size] = 0
    expected = {k: v for k, v in dense.items() if k[0] == 0} | wanda_sp_by_hand(masked, WINDOWS, range(1, 2))
    assert_scores(plan, expected)
    assert any(abs(expected[k] - dense[k]) > 1e-3 * dense[k] for k in expected if k[0] == 1)
    for (layer, module), group in plan.groupby(["layer", "module"]):
        lowest = set(group.nsmallest(remove[module], "score").unit)
        assert set(group.loc[~group.keep, "unit"]) == lowest, (layer, module)


def flap_fluctuation_by_hand(x: torch.Tensor) -> torch.Tensor:
    """FLAP's running estimate in closed form: with window k's squared deviations S_k around the mean
    of the first k+1 window means, fluct = sum_{k>=1} k/(k+1) * S_k / (N - 1) over N windows."""
    n, total = x.shape[0], torch.zeros(x.shape[-1], dtype=torch.float64)
    for k in range(1, n):
        mean = x[: k + 1].mean(dim=1).mean(dim=0)
        total += k / (k + 1) * (x[k] - mean).pow(2).sum(dim=0)
    return total / (n - 1)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_flap_is_the_standardised_weighted_fluctuation_squared_for_attention(kind: str, batch_size: int) -> None:
    """WIFV per column (fluctuation x squared column norm), squared for o_proj, z-scored over the layer's
    columns (std with n - 1), a unit's mean z; input_mean the columns' calibration means."""
    model = tiny_llama(kind)
    inputs = linear_inputs(model, WINDOWS)
    table = flap_scores(model, WINDOWS, batch_size)
    expected, means = {}, {}
    for i in range(2):
        for module, name in OUTPUTS:
            x = inputs[(i, name)].view(len(WINDOWS), WINDOWS.shape[1], -1)
            metric = flap_fluctuation_by_hand(x) * param(model, i, name, "weight").pow(2).sum(dim=0)
            metric = metric.pow(2) if module == "attn" else metric
            z = (metric - metric.mean()) / metric.std()
            size = unit_size(model, module)
            for unit in range(x.shape[-1] // size):
                expected[(i, module, unit)] = z[unit * size : (unit + 1) * size].mean().item()
                means[(i, module, unit)] = x.flatten(0, 1)[:, unit * size : (unit + 1) * size].mean(dim=0)
    assert_scores(table, expected, atol=1e-5)  # z-scores near 0: float32 activations against float64
    for r in table.itertuples():
        torch.testing.assert_close(torch.tensor(r.input_mean, dtype=torch.float64), means[(r.layer, r.module, r.unit)])


def test_random_is_seeded_and_ignores_the_data() -> None:
    model = tiny_llama("gqa")
    first = random_scores(model, WINDOWS, 2)
    other_data = random_scores(model, torch.zeros_like(WINDOWS), 5)
    pd.testing.assert_frame_equal(first, other_data)
    assert first.score.between(0, 1).all() and first.score.nunique() == len(first)


@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_every_criterion_scores_each_unit_once_and_leaves_the_model_alone(method: str) -> None:
    model = tiny_llama("gqa_bias").train().requires_grad_(False)  # as load_model leaves nothing trainable
    before = copy.deepcopy(model.state_dict())
    table = CRITERIA[method](model, WINDOWS, 2)
    units = [(i, m, u) for i in range(2) for m, n in (("attn", 3), ("mlp", 40)) for u in range(n)]
    assert sorted(zip(table.layer, table.module, table.unit, strict=True)) == sorted(units)
    assert torch.isfinite(torch.tensor(table.score.values)).all()
    assert method == "flap" or (table.score >= 0).all()  # FLAP's scores are z-scores
    assert table.score.dtype == "float64" and table.score.nunique() > len(table) // 2
    assert model.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.4])
def test_every_method_and_mode_removes_the_same_budget(kind: str, sparsity: float) -> None:
    """Half an attention unit (attention counts are whole) plus one MLP block of tolerance, measured
    on the pruned models themselves."""
    model = tiny_llama(kind, intermediate_size=64)
    c, multiple = model.config, 8
    group = c.head_dim * c.num_attention_heads // c.num_key_value_heads
    attn_unit = (2 * group + 2 * c.head_dim) * c.hidden_size + c.attention_bias * (group + 2 * c.head_dim)
    mlp_unit = 3 * c.hidden_size + 2 * c.mlp_bias
    dense = param_counts(model)["params_attn_mlp"]
    tolerance = attn_unit / 2 + multiple * mlp_unit
    removed, plans = {}, set()
    for method, criterion in CRITERIA.items():
        scores = criterion(model, WINDOWS, 2)
        for mode in AllocationParams.MODES:
            plan = allocate_for_model(model, scores, sparsity, 3.0, multiple, mode)
            pruned = copy.deepcopy(model)
            prune_model(pruned, plan)
            removed[(method, mode)] = dense - param_counts(pruned)["params_attn_mlp"]
            plans.add(tuple(plan.keep))
    for key, count in removed.items():
        assert abs(count - sparsity * dense) <= tolerance, (key, count, sparsity * dense, tolerance)
    assert len(plans) > len(CRITERIA), len(plans)  # the criteria and modes really choose differently


def test_criteria_and_methods_name_the_same_criteria() -> None:
    """CRITERIA scores a criterion, METHODS (params, which cannot import the method) validates its name and
    gives its allocation: a criterion registered in one but not the other is half added."""
    assert set(CRITERIA) == set(METHODS)


def toy_scores(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """A toy criterion: a unit's score is its index, so the lowest units of every module go first."""
    adapter = get_adapter(model.config)
    return score_table(model, lambda layer, module: torch.arange(adapter.unit_count(layer, module)).float())


def test_a_toy_criterion_needs_only_its_function_and_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered in CRITERIA and METHODS (with Wanda-sp's uniform allocation), a toy criterion passes
    params validation, scores as compute_saliency calls it, gets its allocation and is pruned: each
    module loses its lowest-index units, the same count in every layer, as masking them would."""
    monkeypatch.setitem(CRITERIA, "toy", toy_scores)
    monkeypatch.setitem(METHODS, "toy", "uniform")
    allocation = defaults(AllocationParams, mlp_multiple=1, attn_multiple=1, mode=None)
    params = defaults(Params, method="toy", sparsity=0.3, gamma=3.0, allocation=allocation)
    assert allocation_mode(params) == "uniform"
    dense = tiny_decoder("llama")
    adapter = get_adapter(dense.config)
    plan = plan_for(dense, CRITERIA["toy"](dense, WINDOWS, 2), params, params.sparsity)
    dropped = plan[~plan.keep].groupby("module").unit.max() + 1  # units 0 .. k-1 of each module
    assert sorted(dropped.index) == ["attn", "mlp"]
    for module, group in plan.groupby("module"):
        assert list(group.keep) == [u >= dropped[module] for u in group.unit], module
        assert (plan[(plan.module == module) & ~plan.keep].groupby("layer").size() == dropped[module]).all()
    pruned, zeroed = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(pruned, plan, adapter=get_adapter(pruned.config))
    zero_model(zeroed, plan)
    for before, after in zip(adapter.layers(dense), get_adapter(pruned.config).layers(pruned), strict=True):
        for module in adapter.modules(before):
            n, out = adapter.unit_count(before, module), adapter.output_slice(before, module)
            kept = unit_rows(torch.arange(int(dropped[module]), n), out.size, out.groups, n)
            expected = adapter.output_projection(before, module).weight[:, kept]
            assert torch.equal(adapter.output_projection(after, module).weight, expected), module
    with torch.no_grad():
        torch.testing.assert_close(pruned(WINDOWS).logits, zeroed(WINDOWS).logits, atol=1e-5, rtol=0)
