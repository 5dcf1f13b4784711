"""Adaptive sparsity allocation (method §2): two global pools of units and the ratio gamma."""

from __future__ import annotations

import itertools

import pandas as pd
from transformers import PreTrainedModel

from nirvana.models import get_adapter


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


def _remove_attention(attn: pd.DataFrame, count: int) -> set[int]:
    """Row labels of the `count` lowest-scoring attention units; each layer keeps its best."""
    ranked = attn.sort_values(["score", "layer", "unit"])
    best = ranked.groupby("layer").tail(1).index
    return set(ranked.drop(index=best).index[:count])


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


def allocate(
    scores: pd.DataFrame, sparsity: float, gamma: float, attn_params: int, mlp_params: int, mlp_multiple: int
) -> pd.DataFrame:
    """The score table plus a boolean `keep` column: the pruning plan."""
    attn = scores[scores["module"] == "attn"]
    mlp = scores[scores["module"] == "mlp"]
    p_attn, p_mlp = pool_fractions(sparsity, gamma, attn_params, len(attn), mlp_params, len(mlp))
    removed = _remove_attention(attn, round(p_attn * len(attn)))
    removed |= _remove_mlp(mlp, round(p_mlp * len(mlp)), mlp_multiple)
    plan = scores.copy()
    plan["keep"] = ~plan.index.isin(list(removed))
    return plan


def allocate_for_model(
    model: PreTrainedModel, scores: pd.DataFrame, sparsity: float, gamma: float, mlp_multiple: int
) -> pd.DataFrame:
    """`allocate` with the per-unit parameter counts read off the model's first layer."""
    adapter = get_adapter(model.config)
    layer = adapter.layers(model)[0]
    return allocate(
        scores, sparsity, gamma, adapter.unit_params(layer, "attn"), adapter.unit_params(layer, "mlp"), mlp_multiple
    )


def layer_widths(plan: pd.DataFrame) -> pd.DataFrame:
    """Per layer: kept and dense attention units and MLP channels (the plotted widths)."""
    counts = plan.groupby(["layer", "module"])["keep"].agg(["sum", "size"]).unstack("module")
    return pd.DataFrame(
        {
            "layer": counts.index.astype(int),
            "attn_kept": counts[("sum", "attn")].astype(int).values,
            "attn_dense": counts[("size", "attn")].astype(int).values,
            "mlp_kept": counts[("sum", "mlp")].astype(int).values,
            "mlp_dense": counts[("size", "mlp")].astype(int).values,
        }
    )
