"""Every combination a user can choose, on tiny models: criterion x allocation mode x attention
granularity x architecture (Llama-style with and without GQA, Qwen2 with biases, Gemma 3, T5).

Each accepted cell prunes through the pipeline's own plan (`nirvana.method.plan.plan_for`) and must give
the dense model's logits with the removed units zeroed, remove the requested share of attention+MLP
parameters to within half an attention unit and one MLP block, and reload with the same logits.
Refused cells are refused in one line. Scores are invariant under a function-preserving swap of KV
groups, and each architecture x granularity exports to GGUF or refuses in one line."""

from __future__ import annotations

import copy
import dataclasses
from functools import cache
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from conftest import save_tokenizer, tiny_decoder, tiny_t5
from nirvana.core.errors import InputError
from nirvana.core.params import ParamError, Params, load_params
from nirvana.deploy.gguf import export
from nirvana.deploy.gguf_errors import ExportError
from nirvana.evaluation.perplexity import param_counts
from nirvana.method.allocation import check_reachable, planned_sparsity, unit_sizes
from nirvana.method.criteria import CRITERIA
from nirvana.method.forward import model_inputs
from nirvana.method.plan import plan_for
from nirvana.method.surgery import prune_model, zero_model
from nirvana.models import GRANULARITY_KEY, get_adapter

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = torch.randint(1, 63, (4, 10), generator=torch.Generator().manual_seed(11))
SPARSITY, MLP_MULTIPLE = 0.3, 8
DECODERS: dict[str, tuple[str, dict]] = {  # conftest.tiny_decoder's model types, 48 MLP channels (6 blocks of 8)
    "llama_gqa": ("llama", dict(intermediate_size=48)),
    "llama_mha": ("llama", dict(intermediate_size=48, num_attention_heads=4, num_key_value_heads=4)),
    "qwen2": ("qwen2", dict(intermediate_size=48)),
    "gemma3_text": ("gemma3_text", dict(intermediate_size=48)),
}
ARCHITECTURES = (*DECODERS, "t5")
GRANULARITIES = ("group", "query_head")
MODES = ("nirvana", "uniform", "llm_pruner", "flap")
ONE_LINE = (ParamError, InputError, ExportError)


def build(arch: str, granularity: str) -> PreTrainedModel:
    """A random 3-layer model with distinct weights everywhere; raises if the granularity is refused."""
    if arch == "t5":
        model = tiny_t5("gated-gelu")
        setattr(model.config, GRANULARITY_KEY, granularity)
    else:
        model_type, overrides = DECODERS[arch]
        model = tiny_decoder(model_type, granularity, **overrides)
    get_adapter(model.config)  # the adapter judges the granularity
    return model


@cache
def dense(arch: str, granularity: str) -> PreTrainedModel | str:
    """The cell's dense model, or the one-line refusal of its granularity."""
    try:
        return build(arch, granularity)
    except ONE_LINE as err:
        return str(err)


@cache
def scores(arch: str, granularity: str, method: str) -> pd.DataFrame:
    model = dense(arch, granularity)
    assert isinstance(model, PreTrainedModel)
    return CRITERIA[method](copy.deepcopy(model), WINDOWS, 2)


def run_params(method: str, mode: str) -> Params:
    """The committed params.yaml with this cell's criterion, allocation mode and a fixed gamma."""
    base = load_params(ROOT / "params.yaml")
    allocation = dataclasses.replace(base.allocation, mode=mode, mlp_multiple=MLP_MULTIPLE, attn_multiple=1, band=None)
    return dataclasses.replace(base, method=method, sparsity=SPARSITY, gamma=2.0, allocation=allocation)


def logits(model: PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(model, WINDOWS)).logits


def tolerance(model: PreTrainedModel) -> float:
    """Half an attention unit (whole units only) and one MLP block, in parameters."""
    attn, mlp = unit_sizes(model)
    return attn / 2 + MLP_MULTIPLE * mlp


@pytest.mark.parametrize("method", sorted(CRITERIA))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cell(arch: str, granularity: str, mode: str, method: str, tmp_path: Path) -> None:
    model = dense(arch, granularity)
    if isinstance(model, str):  # refused: one line that names the key
        assert "attention.granularity" in model and "\n" not in model
        return
    params = run_params(method, mode)
    check_reachable(model, params)
    working = copy.deepcopy(model)
    plan = plan_for(working, scores(arch, granularity, method), params, SPARSITY, WINDOWS)

    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    zero_model(zeroed, plan)
    prune_model(pruned, plan)
    torch.testing.assert_close(logits(pruned), logits(zeroed), atol=1e-5, rtol=0)

    before, after = param_counts(model)["params_attn_mlp"], param_counts(pruned)["params_attn_mlp"]
    assert abs((before - after) - SPARSITY * before) <= tolerance(model), (before - after, SPARSITY * before)
    assert planned_sparsity(plan, *unit_sizes(model)) == pytest.approx((before - after) / before)

    pruned.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    torch.testing.assert_close(logits(auto.from_pretrained(tmp_path).eval()), logits(pruned), atol=0, rtol=0)


def swap_kv_groups(model: PreTrainedModel, order: list[int]) -> PreTrainedModel:
    """The same function with KV groups reordered: new group g is old group order[g] (q rows, k/v rows
    and biases, o_proj columns)."""
    model = copy.deepcopy(model)
    c = model.config
    heads, kv, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    group = torch.tensor(order)

    def index(block: int) -> torch.Tensor:
        return (group[:, None] * block + torch.arange(block)).flatten()

    with torch.no_grad():
        for layer in get_adapter(c).layers(model):
            attn = layer.self_attn
            for proj, block in ((attn.q_proj, heads // kv * dim), (attn.k_proj, dim), (attn.v_proj, dim)):
                proj.weight.copy_(proj.weight[index(block)])
                if proj.bias is not None:
                    proj.bias.copy_(proj.bias[index(block)])
            attn.o_proj.weight.copy_(attn.o_proj.weight[:, index(heads // kv * dim)])
    return model


@pytest.mark.parametrize("method", sorted(CRITERIA))
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2"])
def test_swapping_kv_groups_leaves_unit_scores_unchanged(arch: str, granularity: str, method: str) -> None:
    """A query-head unit spans every group, so its score is the same; a group's score moves with it."""
    model = dense(arch, granularity)
    assert isinstance(model, PreTrainedModel)
    order = [1, 0] if model.config.num_key_value_heads == 2 else [1, 2, 0]
    swapped = swap_kv_groups(model, order)
    torch.testing.assert_close(logits(swapped), logits(model), atol=1e-5, rtol=0)  # the same function
    before = scores(arch, granularity, method).set_index(["layer", "module", "unit"])["score"]
    after = CRITERIA[method](swapped, WINDOWS, 2).set_index(["layer", "module", "unit"])["score"]
    if granularity == "group" and method != "random":  # random's scores follow the shape, not the weights
        moved = [(layer, module, order[unit] if module == "attn" else unit) for layer, module, unit in after.index]
        after = pd.Series(after.to_numpy(), pd.MultiIndex.from_tuples(moved, names=after.index.names), name="score")
    pd.testing.assert_series_equal(after.sort_index(), before.sort_index(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "t5"])
def test_pruned_models_export_to_gguf_or_refuse_in_one_line(arch: str, granularity: str, tmp_path: Path) -> None:
    model = dense(arch, granularity)
    if isinstance(model, str):
        return
    plan = plan_for(
        copy.deepcopy(model), scores(arch, granularity, "magnitude"), run_params("magnitude", "nirvana"), SPARSITY
    )
    prune_model(model := copy.deepcopy(model), plan)
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tmp_path / "model")
    try:
        export(tmp_path / "model", tmp_path / "model.gguf", "f16")
    except ExportError as err:
        assert "\n" not in str(err)
        assert not (tmp_path / "model.gguf").exists()
    else:
        assert (tmp_path / "model.gguf").stat().st_size > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("arch", "granularity"), [("llama_gqa", "group"), ("llama_gqa", "query_head"), ("t5", "group")]
)
def test_every_accepted_sparsity_is_met(arch: str, granularity: str, mode: str) -> None:
    """Up to the most the guards allow, at low and high gamma: the plan removes the requested share
    (to half an attention unit and one MLP block), or `check_reachable` refuses in one line first."""
    model = dense(arch, granularity)
    assert isinstance(model, PreTrainedModel)
    table = scores(arch, granularity, "magnitude")
    before = param_counts(model)["params_attn_mlp"]
    accepted = 0
    for sparsity in (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9):
        for gamma in (0.1, 1.0, 16.0):
            params = dataclasses.replace(run_params("magnitude", mode), sparsity=sparsity, gamma=gamma)
            try:
                check_reachable(model, params)
            except ONE_LINE as err:
                assert "sparsity" in str(err) and "\n" not in str(err)
                continue
            accepted += 1
            plan = plan_for(model, table, params, sparsity)
            removed = planned_sparsity(plan, *unit_sizes(model)) * before
            assert abs(removed - sparsity * before) <= tolerance(model), (sparsity, gamma, removed / before)
    assert accepted >= 9, "most of these sparsities are reachable"
