"""Sparsity allocation: NIRVANA's two global pools and gamma (method §2), and the baselines' own
allocations: the same counts in every layer (uniform, Wanda-sp) and FLAP's one global threshold
on standardised scores. For a given sparsity all three remove the same attention+MLP parameter
count up to the granularity of one attention unit and one MLP block."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from transformers import PreTrainedModel

from nirvana.models import get_adapter, pool
from nirvana.params import Params

METHOD_MODES = {"wanda_sp": "uniform", "flap": "flap"}
"""Each baseline's published allocation; every other method uses NIRVANA's two pools."""


def resolve_mode(method: str, mode: str | None) -> str:
    """`mode`, or when null the allocation `method` was published with."""
    return mode or METHOD_MODES.get(method, "nirvana")


def allocation_mode(params: Params) -> str:
    """The allocation a run uses (`resolve_mode` of its method and `allocation.mode`)."""
    return resolve_mode(params.method, params.allocation.mode)


def pool_fractions(
    sparsity: float, gamma: float, attn_params: int, n_attn: int, mlp_params: int, n_mlp: int
) -> tuple[float, float]:
    """Fractions (p_attn, p_mlp) of units to remove so that p_mlp = gamma * p_attn and the
    removed parameters are `sparsity` of all attention+MLP parameters. If p_mlp would exceed
    1 it is clipped and attention takes the rest."""
    attn_total, mlp_total = attn_params * n_attn, mlp_params * n_mlp
    budget = sparsity * (attn_total + mlp_total)
    p_attn = budget / (attn_total + gamma * mlp_total)
    p_mlp = gamma * p_attn
    if p_mlp > 1:
        p_mlp = 1.0
        p_attn = (budget - mlp_total) / attn_total
    return min(p_attn, 1.0), p_mlp


def _removable_attention(attn: pd.DataFrame) -> pd.DataFrame:
    """Attention rows lowest score first, without each attention module's best unit (every
    layer keeps one unit of self-attention, and of cross-attention where there is one)."""
    ranked = attn.sort_values(["score", "layer", "module", "unit"])
    return ranked.drop(index=ranked.groupby(["layer", "module"]).tail(1).index)


def _remove_attention(attn: pd.DataFrame, count: int) -> set[int]:
    """Row labels of the `count` lowest-scoring attention units; each layer keeps its best."""
    return set(_removable_attention(attn).index[:count])


def _mlp_blocks(mlp: pd.DataFrame, multiple: int) -> list[tuple[float, int, int, list[int]]]:
    """Per layer, channels in score order cut into removable blocks so that what stays is a
    multiple of `multiple`. A layer's top block is never offered (each layer keeps some).
    Each block is (its highest score, layer, position, row labels)."""
    blocks = []
    for layer, group in mlp.groupby("layer"):
        labels = group.sort_values(["score", "unit"]).index.tolist()
        cuts = list(range(len(labels) % multiple, len(labels), multiple))
        if cuts[0] != 0:
            cuts.insert(0, 0)
        for position, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            chunk = labels[lo:hi]
            blocks.append((float(mlp.at[chunk[-1], "score"]), int(layer), position, chunk))
    return blocks


def _remove_mlp(mlp: pd.DataFrame, count: int, multiple: int) -> set[int]:
    """Row labels of about `count` lowest-scoring MLP channels, whole blocks at a time, lowest
    block first, stopping where the total is closest to `count`."""
    removed: list[int] = []
    for *_, chunk in sorted(_mlp_blocks(mlp, multiple), key=lambda b: b[:3]):
        if abs(len(removed) + len(chunk) - count) >= abs(len(removed) - count):
            break
        removed += chunk
    return set(removed)


def _plan(scores: pd.DataFrame, removed: set[int]) -> pd.DataFrame:
    """The score table (extra columns included) plus a boolean `keep` column: the pruning plan."""
    plan = scores.copy()
    plan["keep"] = ~plan.index.isin(list(removed))
    return plan


def _budget(scores: pd.DataFrame, sparsity: float, attn_params: int, mlp_params: int) -> float:
    """Attention+MLP parameters to remove: `sparsity` of all of them."""
    n_attn = int((scores["module"] != "mlp").sum())
    return sparsity * (attn_params * n_attn + mlp_params * (len(scores) - n_attn))


def allocate(
    scores: pd.DataFrame, sparsity: float, gamma: float, attn_params: int, mlp_params: int, mlp_multiple: int
) -> pd.DataFrame:
    """NIRVANA's allocation: two global pools with p_mlp = gamma * p_attn. Returns the plan."""
    attn = scores[scores["module"] != "mlp"]
    mlp = scores[scores["module"] == "mlp"]
    p_attn, p_mlp = pool_fractions(sparsity, gamma, attn_params, len(attn), mlp_params, len(mlp))
    removed = _remove_attention(attn, round(p_attn * len(attn)))
    removed |= _remove_mlp(mlp, round(p_mlp * len(mlp)), mlp_multiple)
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

    attn = min(round(sparsity * n_attn), n_attn - 1)
    while attn > 0 and rest(attn) < 0:
        attn -= 1
    while attn < n_attn - 1 and rest(attn) > mlp_cap:
        attn += 1
    exact = min(max(round(rest(attn)), 0), mlp_cap)
    aligned = min([0, *range(n_mlp % mlp_multiple, mlp_cap + 1, mlp_multiple)], key=lambda c: abs(c - rest(attn)))
    return attn, aligned if layers * abs(aligned - exact) <= mlp_multiple else exact


def allocate_uniform(
    scores: pd.DataFrame, sparsity: float, attn_params: int, mlp_params: int, mlp_multiple: int
) -> pd.DataFrame:
    """Wanda-sp's allocation: every layer removes the same number of attention units and of MLP
    channels (`uniform_counts`), its lowest-scoring ones (each attention module alike). Gamma does not apply."""
    sizes = scores.groupby(["layer", "module"]).size()
    is_mlp = sizes.index.get_level_values("module") == "mlp"
    attn_sizes, mlp_sizes = sizes[~is_mlp], sizes[is_mlp]
    attn, mlp = uniform_counts(
        sparsity,
        len(mlp_sizes),
        attn_params,
        int(attn_sizes.min()),
        mlp_params,
        int(mlp_sizes.min()),
        mlp_multiple,
        attn_modules=len(attn_sizes),
    )
    ranked = scores.sort_values(["score", "unit"])
    rank = ranked.groupby(["layer", "module"]).cumcount().to_numpy()
    return _plan(scores, set(ranked.index[rank < np.where(ranked["module"] == "mlp", mlp, attn)]))


def standardise(scores: pd.DataFrame) -> pd.Series:
    """(score - mean) / std within each (layer, module), std with n - 1; a constant group scores 0."""
    grouped = scores.groupby(["layer", "module"])["score"]
    spread = grouped.transform("std")
    z = (scores["score"] - grouped.transform("mean")) / spread.where(spread > 0)
    return z.fillna(0.0)


def allocate_flap(
    scores: pd.DataFrame, sparsity: float, attn_params: int, mlp_params: int, mlp_multiple: int
) -> pd.DataFrame:
    """FLAP's allocation: standardised scores, one global ranking of attention units and MLP blocks
    (`mlp_multiple` channels, as in NIRVANA's allocation), removed lowest first up to the prefix whose
    parameter count is closest to the budget. Each layer keeps its best attention unit and top block."""
    z = scores.assign(score=standardise(scores))
    attn = _removable_attention(z[z["module"] != "mlp"])
    items = [(float(row.score), 0, int(row.layer), int(row.unit), [label]) for label, row in attn.iterrows()]
    blocks = _mlp_blocks(z[z["module"] == "mlp"], mlp_multiple)
    items += [(score, 1, layer, position, chunk) for score, layer, position, chunk in blocks]
    items.sort(key=lambda item: item[:4])
    sizes = [attn_params if module == 0 else mlp_params * len(chunk) for _, module, _, _, chunk in items]
    removed = np.concatenate([[0.0], np.cumsum(sizes, dtype=np.float64)])
    cut = int(np.argmin(np.abs(removed - _budget(scores, sparsity, attn_params, mlp_params))))
    return _plan(scores, {label for item in items[:cut] for label in item[4]})


def unit_sizes(model: PreTrainedModel) -> tuple[int, int]:
    """Parameters of one attention unit and of one MLP channel, which must be the same in every layer
    and attention module (the pools count units, method §2)."""
    adapter = get_adapter(model.config)
    sizes: dict[str, set[int]] = {"attn": set(), "mlp": set()}
    for layer in adapter.layers(model):
        for module in adapter.modules(layer):
            sizes[pool(module)].add(adapter.unit_params(layer, module))
    if len(sizes["attn"]) != 1 or len(sizes["mlp"]) != 1:
        raise ValueError(f"units differ in size across layers ({sizes}); allocation needs one size per pool")
    return sizes["attn"].pop(), sizes["mlp"].pop()


def allocate_for_model(
    model: PreTrainedModel, scores: pd.DataFrame, sparsity: float, gamma: float, mlp_multiple: int, mode: str
) -> pd.DataFrame:
    """The plan under allocation `mode` (see `allocation_mode`), with the per-unit parameter counts
    read off the model's first layer."""
    attn_params, mlp_params = unit_sizes(model)
    if mode == "nirvana":
        return allocate(scores, sparsity, gamma, attn_params, mlp_params, mlp_multiple)
    if mode == "uniform":
        return allocate_uniform(scores, sparsity, attn_params, mlp_params, mlp_multiple)
    if mode == "flap":
        return allocate_flap(scores, sparsity, attn_params, mlp_params, mlp_multiple)
    raise ValueError(f"unknown allocation mode {mode!r}")


def layer_widths(plan: pd.DataFrame) -> pd.DataFrame:
    """Per layer: kept and dense units of every module (attention units, MLP channels, and
    cross-attention units on encoder-decoder models; 0 where a layer has no such module)."""
    counts = plan.groupby(["layer", "module"])["keep"].agg(["sum", "size"]).unstack("module", fill_value=0)
    out = pd.DataFrame({"layer": counts.index.astype(int)})
    for module in sorted(plan["module"].unique(), key=lambda m: (m == "mlp", m)):
        out[f"{module}_kept"] = counts[("sum", module)].astype(int).values
        out[f"{module}_dense"] = counts[("size", module)].astype(int).values
    return out
