"""Choosing a plan by held-out KL: among the criteria of `method` (a name or a list) and, under NIRVANA's
allocation with `gamma: auto`, the values of `allocation.gamma_candidates`, the plan whose pruned model
stays closest to the dense model on the held-out KL set (`nirvana.method.kl`, method §3).
Saliency is computed once per criterion and reused by every gamma."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable

import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.core.params import Params
from nirvana.method.allocation import allocation_mode, planned_sparsity, unit_sizes
from nirvana.method.kl import HeldOut
from nirvana.method.plan import plan_for
from nirvana.method.surgery import prune_model


def candidate_runs(params: Params) -> list[Params]:
    """The runs the pipeline chooses among, in order (ties go to the first): each criterion of `method`
    under its allocation, and under NIRVANA's allocation with `gamma: auto` each gamma candidate."""
    out = []
    for method in params.methods:
        run = dataclasses.replace(params, method=method)
        if params.gamma == "auto" and allocation_mode(run) == "nirvana":
            out += [dataclasses.replace(run, gamma=float(g)) for g in params.allocation.gamma_candidates]
        else:
            out.append(run)
    return out


def coarse_to_fine(n: int, kl_at: Callable[[int], float]) -> dict[int, float]:
    """KL at the indices a gamma search visits on a grid of `n` candidates in increasing order: every
    other one (both ends included), then the two neighbours of the best of those. On a 9-point grid that
    is 7 pruned forward passes instead of 9; it finds the grid's minimum unless the KL curve has a dip
    between two coarse points next to neither coarse minimum (results/gamma_search.md checks the recorded
    curves)."""
    seen: dict[int, float] = {}
    for i in sorted({*range(0, n, 2), n - 1}):
        seen[i] = kl_at(i)
    best = min(seen, key=lambda i: (seen[i], i))  # ties go to the lower gamma, as in `select_plan`
    for i in (best - 1, best + 1):
        if 0 <= i < n and i not in seen:
            seen[i] = kl_at(i)
    return dict(sorted(seen.items()))


def by_method(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """compute_saliency's table split per criterion (its `method` column), without columns a criterion
    does not fill (FLAP's `input_mean`)."""
    return {
        str(method): group.drop(columns="method").dropna(axis=1, how="all").reset_index(drop=True)
        for method, group in scores.groupby("method", sort=False)
    }


def _plan_row(run: Params, plan: pd.DataFrame, sizes: tuple[int, int]) -> dict:
    """What a compared plan keeps: its criterion, allocation, gamma (where the allocation has one), widths and a
    digest of the kept units (so a KL measured elsewhere on the same plan can be recognised)."""
    attn, mlp = plan[plan["module"] != "mlp"], plan[plan["module"] == "mlp"]
    nirvana = allocation_mode(run) == "nirvana"
    return {
        "method": run.method,
        "allocation": allocation_mode(run),
        "gamma": float(run.gamma) if nirvana else float("nan"),  # auto became each candidate (`candidate_runs`)
        "attn_kept": int(attn["keep"].sum()),
        "attn_dense": len(attn),
        "mlp_kept": int(mlp["keep"].sum()),
        "mlp_dense": len(mlp),
        "sparsity_realised": round(planned_sparsity(plan, *sizes), 6),
        "plan_digest": hashlib.sha256(plan["keep"].to_numpy(dtype=bool).tobytes()).hexdigest()[:16],
    }


def recorded_kl(known: pd.DataFrame | None, row: dict) -> float | None:
    """The KL `known` (rows of an earlier `select_plan` on the same model and held-out set) holds for the plan
    of `row`, if it holds that plan."""
    if known is None or "plan_digest" not in known:
        return None
    same = known[(known["method"] == row["method"]) & (known["plan_digest"] == row["plan_digest"])]
    return None if same.empty else float(same["kl"].iloc[0])


def select_plan(
    model: PreTrainedModel,
    scores: dict[str, pd.DataFrame],
    params: Params,
    sparsity: float,
    windows: torch.Tensor | None = None,
    held_out: HeldOut | None = None,
    measure: Callable[[PreTrainedModel], dict] | None = None,
    known: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan of lowest held-out KL among `candidate_runs(params)` at `sparsity`, and one row per plan it
    measured (`_plan_row`, kl, selected, plus what `measure` reports on each pruned model): every criterion,
    and the gammas `coarse_to_fine` visits. `scores` holds each criterion's saliency; `windows` are the
    calibration windows (Wanda-sp's layer-by-layer plan); a plan whose KL `known` holds is not pruned
    again (the calibration search's winner). Without `held_out` there must be one run, and nothing is
    pruned or measured."""
    runs = candidate_runs(params)
    sizes = unit_sizes(model)
    if held_out is None:
        assert len(runs) == 1, "choosing among several plans needs the held-out KL set"
        plan = plan_for(model, scores[str(runs[0].method)], runs[0], sparsity, windows)
        row = _plan_row(runs[0], plan, sizes) | {"kl": float("nan"), "selected": True}
        return plan, pd.DataFrame([row])
    plans: dict[int, pd.DataFrame] = {}
    rows: dict[int, dict] = {}
    progress = tqdm(desc="plans", unit="plan", disable=len(runs) == 1)

    def kl_at(i: int) -> float:
        run, pruned = runs[i], copy.deepcopy(model)  # a layer-by-layer plan zeroes units in the model it is made on
        plans[i] = plan_for(pruned, scores[str(run.method)], run, sparsity, windows)
        rows[i] = _plan_row(run, plans[i], sizes)
        kl = recorded_kl(known, rows[i])
        if kl is None:
            prune_model(pruned, plans[i])
            kl = held_out.kl(pruned)
            rows[i] |= measure(pruned) if measure else {}
        rows[i] = {**rows[i], "kl": kl}
        progress.update()
        return kl

    for method in params.methods:  # each criterion's runs: one, or one per gamma (increasing, as params checks)
        block = [i for i, r in enumerate(runs) if r.method == method]
        coarse_to_fine(len(block), lambda j: kl_at(block[j]))  # noqa: B023 (called before the loop moves on)
    progress.close()
    order = sorted(rows)
    table = pd.DataFrame([rows[i] for i in order])
    winner = int(table["kl"].idxmin())  # the first of equal minima: ties go to the earlier run
    table["selected"] = table.index == winner
    return plans[order[winner]], table


def plan_metrics(table: pd.DataFrame) -> dict[str, object]:
    """metrics/plan.json: the selected criterion and gamma, and with a search its KL against the
    runner-up, the median and the worst plan (`choices` counts the plans measured)."""
    row = table[table["selected"]].iloc[0]
    out: dict[str, object] = {
        "choices": len(table),
        "method": str(row["method"]),
        "gamma": None if pd.isna(row["gamma"]) else float(row["gamma"]),
        "sparsity_realised": float(row["sparsity_realised"]),
    }
    kl = table["kl"].dropna().sort_values()
    if len(kl) > 1:
        out |= {
            "kl_selected": float(kl.iloc[0]),
            "kl_runner_up": float(kl.iloc[1]),
            "kl_median": float(kl.median()),
            "kl_worst": float(kl.iloc[-1]),
        }
    return out
