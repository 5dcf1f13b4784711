"""Choosing a plan by held-out KL: among the criteria of `method` (a name or a list) and, under NIRVANA's
allocation with `gamma: auto`, the values of `allocation.gamma_candidates`, the plan whose pruned model
stays closest to the dense model on the held-out KL set (the calibration search's, method §3).
Saliency is computed once per criterion and reused by every gamma."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.allocation import allocation_mode, planned_sparsity, unit_sizes
from nirvana.forward import model_inputs
from nirvana.params import Params
from nirvana.plan import plan_for
from nirvana.surgery import prune_model


@torch.no_grad()
def log_probs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Float32 log-probabilities over the vocabulary, one chunk of windows at a time (on the CPU)."""
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        logits = model(**model_inputs(model, windows[start : start + batch_size].to(device)), use_cache=False).logits
        yield torch.log_softmax(logits.float(), dim=-1).cpu()


def kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """sum p (log p - log q), a token with p = 0 adding 0 (0 x -inf would make it NaN where log p = -inf);
    on finite inputs the same bits as the plain product's sum."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum().item()


@torch.no_grad()
def kl_to_reference(
    reference: list[torch.Tensor], model: PreTrainedModel, windows: torch.Tensor, batch_size: int
) -> float:
    """KL(P_ref || Q_model) = sum_v p (log p - log q), averaged over every token of `windows`.

    `reference` holds the dense model's log-probabilities in the same chunks."""
    total, tokens = 0.0, 0
    for log_p, log_q in zip(reference, log_probs(model, windows, batch_size), strict=True):
        total += kl_sum(log_p, log_q)
        tokens += log_p.shape[0] * log_p.shape[1]
    return total / tokens


@dataclass
class HeldOut:
    """The held-out KL set with the dense model's log-probabilities on it, computed once."""

    windows: torch.Tensor
    reference: list[torch.Tensor]
    batch_size: int

    @classmethod
    def of(cls, dense: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> HeldOut:
        return cls(windows, list(log_probs(dense, windows, batch_size)), batch_size)

    def kl(self, model: PreTrainedModel) -> float:
        return kl_to_reference(self.reference, model, self.windows, self.batch_size)


def choices(params: Params) -> list[Params]:
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
    best = min(seen, key=lambda i: (seen[i], i))  # ties go to the lower gamma, as in `choose`
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


def _row(run: Params, plan: pd.DataFrame, sizes: tuple[int, int]) -> dict:
    """What a choice keeps: its criterion, allocation, gamma (where the allocation has one), widths and a
    digest of the kept units (so a KL measured elsewhere on the same plan can be recognised)."""
    attn, mlp = plan[plan["module"] != "mlp"], plan[plan["module"] == "mlp"]
    nirvana = allocation_mode(run) == "nirvana"
    return {
        "method": run.method,
        "allocation": allocation_mode(run),
        "gamma": float(run.gamma) if nirvana else float("nan"),  # auto became each candidate (`choices`)
        "attn_kept": int(attn["keep"].sum()),
        "attn_dense": len(attn),
        "mlp_kept": int(mlp["keep"].sum()),
        "mlp_dense": len(mlp),
        "sparsity_realised": round(planned_sparsity(plan, *sizes), 6),
        "plan_digest": hashlib.sha256(plan["keep"].to_numpy(dtype=bool).tobytes()).hexdigest()[:16],
    }


def known_kl(known: pd.DataFrame | None, row: dict) -> float | None:
    """The KL `known` (rows of an earlier `choose` on the same model and held-out set) holds for the plan
    of `row`, if it holds that plan."""
    if known is None or "plan_digest" not in known:
        return None
    same = known[(known["method"] == row["method"]) & (known["plan_digest"] == row["plan_digest"])]
    return None if same.empty else float(same["kl"].iloc[0])


def choose(
    model: PreTrainedModel,
    scores: dict[str, pd.DataFrame],
    params: Params,
    sparsity: float,
    windows: torch.Tensor | None = None,
    held_out: HeldOut | None = None,
    measure: Callable[[PreTrainedModel], dict] | None = None,
    known: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan of lowest held-out KL among `choices(params)` at `sparsity`, and one row per choice it
    measured (`_row`, kl, selected, plus what `measure` reports on each pruned model): every criterion,
    and the gammas `coarse_to_fine` visits. `scores` holds each criterion's saliency; `windows` are the
    calibration windows (Wanda-sp's layer-by-layer plan); a plan whose KL `known` holds is not pruned
    again (the calibration search's winner). Without `held_out` there must be one choice, and nothing is
    pruned or measured."""
    runs = choices(params)
    sizes = unit_sizes(model)
    if held_out is None:
        assert len(runs) == 1, "choosing among several plans needs the held-out KL set"
        plan = plan_for(model, scores[str(runs[0].method)], runs[0], sparsity, windows)
        row = _row(runs[0], plan, sizes) | {"kl": float("nan"), "selected": True}
        return plan, pd.DataFrame([row])
    plans: dict[int, pd.DataFrame] = {}
    rows: dict[int, dict] = {}
    progress = tqdm(desc="plans", unit="plan", disable=len(runs) == 1)

    def kl_at(i: int) -> float:
        run, pruned = runs[i], copy.deepcopy(model)  # a layer-by-layer plan zeroes units in the model it is made on
        plans[i] = plan_for(pruned, scores[str(run.method)], run, sparsity, windows)
        rows[i] = _row(run, plans[i], sizes)
        kl = known_kl(known, rows[i])
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
    winner = int(table["kl"].idxmin())  # the first of equal minima: ties go to the earlier choice
    table["selected"] = table.index == winner
    return plans[order[winner]], table


def summary(table: pd.DataFrame) -> dict[str, object]:
    """metrics/plan.json: the chosen criterion and gamma, and with a search its KL against the
    runner-up, the median and the worst choice."""
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
