"""Sparsity allocation: NIRVANA's two global pools and gamma (method §2), and the baselines' own
allocations: the same counts in every layer (uniform, Wanda-sp's; layer by layer: nirvana.method.plan), the
same counts in every layer of a band (LLM-Pruner) and FLAP's one global threshold on standardised
scores. For a given sparsity all of them remove the same attention+MLP parameter count up to the
granularity of one attention unit and one MLP block."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from transformers import PreTrainedModel

from nirvana.core.errors import InputError
from nirvana.core.params import METHODS, Params
from nirvana.models import Adapter, get_adapter, pool

LLM_PRUNER_BAND = (4, 30, 32)
"""LLM-Pruner's Llama commands prune layers 4 to 29 of 32 (--block_*_layer_start 4, _end 30)."""


def resolve_mode(method: str, mode: str | None) -> str:
    """`mode`, or when null the allocation `method` was published with (`METHODS`; NIRVANA's two
    pools for a name it does not know, e.g. from an older run's params)."""
    return mode or METHODS.get(method, "nirvana")


def allocation_mode(params: Params) -> str:
    """The allocation a run of one criterion uses (`resolve_mode` of its method and `allocation.mode`)."""
    assert isinstance(params.method, str), "one criterion at a time (nirvana.method.selection.candidate_runs)"
    return resolve_mode(params.method, params.allocation.mode)


def pool_fractions(
    sparsity: float,
    gamma: float,
    attn_params: int,
    n_attn: int,
    mlp_params: int,
    n_mlp: int,
    mlp_cap: float = 1.0,
    attn_cap: float = 1.0,
) -> tuple[float, float]:
    """Fractions (p_attn, p_mlp) of units to remove so that p_mlp = gamma * p_attn and the
    removed parameters are `sparsity` of all attention+MLP parameters. A pool whose fraction would
    exceed its cap (the removable share the guards leave: each layer keeps its best units) is clipped
    there and the other pool takes the rest, so the budget is met whenever it is reachable."""
    attn_total, mlp_total = attn_params * n_attn, mlp_params * n_mlp
    budget = sparsity * (attn_total + mlp_total)
    p_attn = budget / (attn_total + gamma * mlp_total)
    p_mlp = gamma * p_attn
    if p_mlp > mlp_cap:
        p_mlp = mlp_cap
        p_attn = (budget - mlp_cap * mlp_total) / attn_total
    elif p_attn > attn_cap:
        p_attn = attn_cap
        p_mlp = min((budget - attn_cap * attn_total) / mlp_total, mlp_cap)
    return min(p_attn, attn_cap), p_mlp


def _removable_attention(attn: pd.DataFrame) -> pd.DataFrame:
    """Attention rows lowest score first, without each attention module's best unit (every
    layer keeps one unit of self-attention, and of cross-attention where there is one)."""
    ranked = attn.sort_values(["score", "layer", "module", "unit"])
    return ranked.drop(index=ranked.groupby(["layer", "module"]).tail(1).index)


def _remove_attention(attn: pd.DataFrame, count: int, multiple: int = 1) -> set[int]:
    """Row labels of the `count` lowest-scoring attention units (each layer keeps its best), or with
    `multiple` > 1 about that many in blocks, so kept units per layer stay a multiple of it."""
    if multiple > 1:
        return _remove_blocks(attn, count, multiple)
    return set(_removable_attention(attn).index[:count])


Block = tuple[float, int, str, int, list[int]]
"""(its highest score, layer, module, position within the module, row labels)"""


def _blocks(units: pd.DataFrame, multiple: int) -> list[Block]:
    """Per layer and module, units in score order cut into removable blocks so that what stays is a
    multiple of `multiple`. A module's top block is never offered (each layer keeps some); a module
    of at most `multiple` units offers none."""
    blocks = []
    for (layer, module), group in units.groupby(["layer", "module"]):
        labels = group.sort_values(["score", "unit"]).index.tolist()
        if len(labels) <= multiple:
            continue
        cuts = list(range(len(labels) % multiple, len(labels), multiple))
        if cuts[0] != 0:
            cuts.insert(0, 0)
        for position, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            chunk = labels[lo:hi]
            blocks.append((float(units.at[chunk[-1], "score"]), int(layer), str(module), position, chunk))
    return blocks


def _remove_blocks(units: pd.DataFrame, count: int, multiple: int) -> set[int]:
    """Row labels of about `count` lowest-scoring units, whole blocks at a time, lowest block first,
    stopping where the total is closest to `count`."""
    removed: list[int] = []
    for *_, chunk in sorted(_blocks(units, multiple), key=lambda b: b[:4]):
        if abs(len(removed) + len(chunk) - count) >= abs(len(removed) - count):
            break
        removed += chunk
    return set(removed)


def _removable(units: pd.DataFrame, multiple: int) -> int:
    """Units the guards let go: all but the top block of `multiple` (or all, if that small) per module."""
    sizes = units.groupby(["layer", "module"]).size()
    return int((sizes - sizes.clip(upper=multiple)).sum())


def _plan(scores: pd.DataFrame, removed: set[int]) -> pd.DataFrame:
    """The score table (extra columns included) plus a boolean `keep` column: the pruning plan."""
    plan = scores.copy()
    plan["keep"] = ~plan.index.isin(list(removed))
    return plan


def planned_sparsity(plan: pd.DataFrame, attn_params: int, mlp_params: int) -> float:
    """The share of attention+MLP parameters a plan removes (what prune then measures on the model)."""
    size = np.where(plan["module"] == "mlp", mlp_params, attn_params)
    return float(size[~plan["keep"].to_numpy()].sum() / size.sum())


def _budget(scores: pd.DataFrame, sparsity: float, attn_params: int, mlp_params: int) -> float:
    """Attention+MLP parameters to remove: `sparsity` of all of them."""
    n_attn = int((scores["module"] != "mlp").sum())
    return sparsity * (attn_params * n_attn + mlp_params * (len(scores) - n_attn))


def allocate(
    scores: pd.DataFrame,
    sparsity: float,
    gamma: float,
    attn_params: int,
    mlp_params: int,
    mlp_multiple: int,
    attn_multiple: int = 1,
) -> pd.DataFrame:
    """NIRVANA's allocation: two global pools with p_mlp = gamma * p_attn. Returns the plan."""
    attn = scores[scores["module"] != "mlp"]
    mlp = scores[scores["module"] == "mlp"]
    mlp_cap = _removable(mlp, mlp_multiple) / len(mlp)
    attn_cap = _removable(attn, attn_multiple) / len(attn)
    p_attn, p_mlp = pool_fractions(sparsity, gamma, attn_params, len(attn), mlp_params, len(mlp), mlp_cap, attn_cap)
    removed = _remove_attention(attn, round(p_attn * len(attn)), attn_multiple)
    removed |= _remove_blocks(mlp, round(p_mlp * len(mlp)), mlp_multiple)
    return _plan(scores, removed)


def uniform_counts(
    sparsity: float,
    layers: int,
    attn_params: int,
    n_attn: int,
    mlp_params: int,
    n_mlp: int,
    mlp_multiple: int,
    attn_modules: int | None = None,
    attn_multiple: int = 1,
) -> tuple[int, int]:
    """Units removed in every layer, (attention, MLP), for a layer of n_attn units and n_mlp channels
    (per attention module: `attn_modules` of them in all, default one per layer).

    Attention removes round(sparsity * n_attn) units (stepped towards feasibility only when the MLP
    could not absorb the rest); the MLP removes what brings the total closest to the budget. That
    MLP count leaves a multiple of `mlp_multiple` when rounding to one moves the total by at most one
    MLP block (layers x change <= mlp_multiple), else it is exact: the budget comes first."""
    attn_modules = layers if attn_modules is None else attn_modules
    budget = sparsity * (attn_modules * attn_params * n_attn + layers * mlp_params * n_mlp)
    mlp_cap = max(n_mlp - mlp_multiple, 0)

    def rest(attn: int) -> float:  # MLP channels per layer that would meet the budget
        return (budget - attn_modules * attn * attn_params) / (layers * mlp_params)

    # removable counts that keep a multiple of attn_multiple (all of them if the module is that small)
    valid = [a for a in range(n_attn) if (n_attn - a) % attn_multiple == 0] if n_attn > attn_multiple else [0]
    start = min(round(sparsity * n_attn), n_attn - 1)
    i = min(range(len(valid)), key=lambda k: abs(valid[k] - start))
    while i > 0 and rest(valid[i]) < 0:
        i -= 1
    while i < len(valid) - 1 and rest(valid[i]) > mlp_cap:
        i += 1
    attn = valid[i]
    exact = min(max(round(rest(attn)), 0), mlp_cap)
    aligned = min([0, *range(n_mlp % mlp_multiple, mlp_cap + 1, mlp_multiple)], key=lambda c: abs(c - rest(attn)))
    return attn, aligned if layers * abs(aligned - exact) <= mlp_multiple else exact


def llm_pruner_band(layers: int, band: list[int] | None = None) -> tuple[int, int]:
    """The layers [start, end) that LLM-Pruner prunes: `band`, or its Llama default scaled to `layers`."""
    if band is not None:
        return band[0], band[1]
    start, end, depth = LLM_PRUNER_BAND
    return round(start * layers / depth), round(end * layers / depth)


def uniform_layer_counts(
    scores: pd.DataFrame,
    sparsity: float,
    attn_params: int,
    mlp_params: int,
    mlp_multiple: int,
    attn_multiple: int = 1,
    band: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Attention units (per module) and MLP channels removed in every layer of `band` (default: all
    layers) so that the whole model loses `sparsity` of its attention+MLP parameters (`uniform_counts`)."""
    sizes = scores.groupby(["layer", "module"]).size()
    layer, module = (sizes.index.get_level_values(k) for k in ("layer", "module"))
    inside = (layer >= band[0]) & (layer < band[1]) if band else np.ones(len(sizes), dtype=bool)
    params = np.where(module == "mlp", mlp_params, attn_params) * sizes.to_numpy()
    attn_sizes, mlp_sizes = sizes[inside & (module != "mlp")], sizes[inside & (module == "mlp")]
    return uniform_counts(
        sparsity * params.sum() / params[inside].sum(),
        len(mlp_sizes),
        attn_params,
        int(attn_sizes.min()),
        mlp_params,
        int(mlp_sizes.min()),
        mlp_multiple,
        attn_modules=len(attn_sizes),
        attn_multiple=attn_multiple,
    )


def allocate_uniform(
    scores: pd.DataFrame,
    sparsity: float,
    attn_params: int,
    mlp_params: int,
    mlp_multiple: int,
    attn_multiple: int = 1,
    band: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Every layer (of `band`, LLM-Pruner's; else all, Wanda-sp's) removes the same number of attention
    units and of MLP channels, its lowest-scoring ones (each attention module alike); layers outside
    the band stay dense. Gamma does not apply."""
    attn, mlp = uniform_layer_counts(scores, sparsity, attn_params, mlp_params, mlp_multiple, attn_multiple, band)
    ranked = scores.sort_values(["score", "unit"])
    rank = ranked.groupby(["layer", "module"]).cumcount().to_numpy()
    inside = ranked["layer"].between(*band, inclusive="left") if band else True
    return _plan(scores, set(ranked.index[(rank < np.where(ranked["module"] == "mlp", mlp, attn)) & inside]))


def standardise(scores: pd.DataFrame) -> pd.Series:
    """(score - mean) / std within each (layer, module), std with n - 1; a constant group scores 0."""
    grouped = scores.groupby(["layer", "module"])["score"]
    spread = grouped.transform("std")
    z = (scores["score"] - grouped.transform("mean")) / spread.where(spread > 0)
    return z.fillna(0.0)


def allocate_flap(
    scores: pd.DataFrame,
    sparsity: float,
    attn_params: int,
    mlp_params: int,
    mlp_multiple: int,
    attn_multiple: int = 1,
    standardised: bool = False,
) -> pd.DataFrame:
    """FLAP's allocation: standardised scores (FLAP's own criterion comes `standardised` already), one
    global ranking of attention units and MLP blocks (`mlp_multiple` channels, as in NIRVANA's
    allocation), removed lowest first up to the prefix whose parameter count is closest to the
    budget, each unit weighted by its parameters. Each layer keeps its best attention unit and top block."""
    z = scores if standardised else scores.assign(score=standardise(scores))
    if attn_multiple > 1:
        blocks = _blocks(z[z["module"] != "mlp"], attn_multiple)
        items = [(score, 0, layer, position, chunk) for score, layer, _, position, chunk in blocks]
    else:
        attn = _removable_attention(z[z["module"] != "mlp"])
        items = [(float(row.score), 0, int(row.layer), int(row.unit), [label]) for label, row in attn.iterrows()]
    blocks = _blocks(z[z["module"] == "mlp"], mlp_multiple)
    items += [(score, 1, layer, position, chunk) for score, layer, _, position, chunk in blocks]
    items.sort(key=lambda item: item[:4])
    sizes = [(attn_params if module == 0 else mlp_params) * len(chunk) for _, module, _, _, chunk in items]
    removed = np.concatenate([[0.0], np.cumsum(sizes, dtype=np.float64)])
    cut = int(np.argmin(np.abs(removed - _budget(scores, sparsity, attn_params, mlp_params))))
    return _plan(scores, {label for item in items[:cut] for label in item[4]})


def unit_sizes(model: PreTrainedModel, *, adapter: Adapter | None = None) -> tuple[int, int]:
    """Parameters of one attention unit and of one MLP channel, which must be the same in every layer
    and attention module (the pools count units, method §2)."""
    adapter = adapter or get_adapter(model.config)
    sizes: dict[str, set[int]] = {"attn": set(), "mlp": set()}
    for layer in adapter.layers(model):
        for module in adapter.modules(layer):
            sizes[pool(module)].add(adapter.unit_params(layer, module))
    if len(sizes["attn"]) != 1 or len(sizes["mlp"]) != 1:
        raise ValueError(f"units differ in size across layers ({sizes}); allocation needs one size per pool")
    return sizes["attn"].pop(), sizes["mlp"].pop()


def allocate_for_model(
    model: PreTrainedModel,
    scores: pd.DataFrame,
    sparsity: float,
    gamma: float | None,
    mlp_multiple: int,
    mode: str,
    attn_multiple: int = 1,
    band: list[int] | None = None,
    standardised: bool = False,
) -> pd.DataFrame:
    """The plan under allocation `mode` (see `allocation_mode`), with the per-unit parameter counts
    read off the model (`unit_sizes`); `gamma` is nirvana's, `band` llm_pruner's, `standardised` flap's."""
    attn_params, mlp_params = unit_sizes(model)
    if mode == "nirvana":
        assert gamma is not None, "NIRVANA's allocation needs a gamma"
        return allocate(scores, sparsity, gamma, attn_params, mlp_params, mlp_multiple, attn_multiple)
    if mode == "uniform":
        return allocate_uniform(scores, sparsity, attn_params, mlp_params, mlp_multiple, attn_multiple)
    if mode == "llm_pruner":
        layers = llm_pruner_band(int(scores["layer"].max()) + 1, band)
        return allocate_uniform(scores, sparsity, attn_params, mlp_params, mlp_multiple, attn_multiple, layers)
    if mode == "flap":
        return allocate_flap(scores, sparsity, attn_params, mlp_params, mlp_multiple, attn_multiple, standardised)
    raise ValueError(f"unknown allocation mode {mode!r}")


def max_sparsity(
    model: PreTrainedModel,
    mlp_multiple: int,
    attn_multiple: int,
    band: tuple[int, int] | None = None,
    *,
    adapter: Adapter | None = None,
) -> float:
    """The most attention+MLP parameters an allocation can remove: every attention module keeps
    `attn_multiple` units and every MLP `mlp_multiple` channels (all of them where it has fewer);
    layers outside `band` keep everything."""
    adapter = adapter or get_adapter(model.config)
    sizes = dict(zip(("attn", "mlp"), unit_sizes(model, adapter=adapter), strict=True))
    multiples = {"attn": attn_multiple, "mlp": mlp_multiple}
    total = removable = 0
    for index, layer in enumerate(adapter.layers(model)):
        for module in adapter.modules(layer):
            n, kind = adapter.unit_count(layer, module), pool(module)
            total += n * sizes[kind]
            if band is None or band[0] <= index < band[1]:
                removable += (n - min(n, multiples[kind])) * sizes[kind]
    return removable / total


def check_reachable(model: PreTrainedModel, params: Params) -> None:
    """Refuse, before any work, a sparsity the guards make unreachable (it would silently fall short),
    under the allocation of every criterion of `method`."""
    adapter = get_adapter(model.config)
    for method in params.methods:
        _check_reachable(model, params, resolve_mode(method, params.allocation.mode), adapter)


def _check_reachable(model: PreTrainedModel, params: Params, mode: str, adapter: Adapter) -> None:
    a, at = params.allocation, params.calibration.select_at_sparsity
    band, where = None, ""
    if mode == "llm_pruner":
        layers = len(adapter.layers(model))
        band = llm_pruner_band(layers, a.band)
        if band[1] > layers:
            raise InputError(f"allocation.band = {a.band} ends past this model's {layers} layers")
        where = f" and only layers {band[0]}-{band[1] - 1} are pruned (allocation.band, llm_pruner)"
    reachable = max_sparsity(model, a.mlp_multiple, a.attn_multiple, band, adapter=adapter)
    for key, value in (("sparsity", params.sparsity), ("calibration.select_at_sparsity", at)):
        if value is not None and value > reachable:
            raise InputError(
                f"{key} = {value} is unreachable: every layer keeps at least {a.attn_multiple} attention "
                f"unit(s) and {a.mlp_multiple} MLP channels (allocation.attn_multiple, allocation.mlp_multiple)"
                f"{where}, so at most {math.floor(reachable * 1e4) / 1e4} of this model's attention+MLP "
                "parameters can go"
            )


def plan_widths(plan: pd.DataFrame) -> pd.DataFrame:
    """Per layer: kept and dense units of every module (attention units, MLP channels, and
    cross-attention units on encoder-decoder models; 0 where a layer has no such module)."""
    counts = plan.groupby(["layer", "module"])["keep"].agg(["sum", "size"]).unstack("module", fill_value=0)
    out = pd.DataFrame({"layer": counts.index.astype(int)})
    for module in sorted(plan["module"].unique(), key=lambda m: (m == "mlp", m)):
        out[f"{module}_kept"] = counts[("sum", module)].astype(int).values
        out[f"{module}_dense"] = counts[("size", module)].astype(int).values
    return out
