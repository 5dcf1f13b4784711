"""Choosing a plan by held-out KL: among the criteria of `method` (a name or a list) and, under NIRVANA's
allocation with `gamma: auto`, the values of `allocation.gamma_candidates`, the plan whose pruned model
stays closest to the dense model on the held-out KL set (the calibration search's, method §3).
Saliency is computed once per criterion and reused by every gamma; the dense model's half of the KL once per
stage, and the outputs of the leading layers that plans leave dense once per stage too (`HeldOut`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import takewhile

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from nirvana.core.params import Params
from nirvana.method.allocation import allocation_mode, planned_sparsity, unit_sizes
from nirvana.method.forward import is_seq2seq, model_inputs
from nirvana.method.plan import plan_for
from nirvana.method.surgery import prune_model
from nirvana.models import get_adapter


def chunk_log_probs(model: PreTrainedModel, windows: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities over the vocabulary of one chunk of windows (on the CPU)."""
    device = next(model.parameters()).device
    logits = model(**model_inputs(model, windows.to(device)), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def log_probs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """`chunk_log_probs` of `windows`, `batch_size` windows at a time."""
    for chunk in windows.split(batch_size):
        yield chunk_log_probs(model, chunk)


BLOCK = 64
"""Vocabulary entries summed in float32 before float64 takes over (`vocab_sums`)."""


def vocab_sums(terms: torch.Tensor) -> torch.Tensor:
    """Sums over the last (vocabulary) dimension: float32 within blocks of `BLOCK` entries, float64 across
    them. A token's KL is the difference of two such sums, each several times its size: float32 throughout
    loses digits of it (tests/test_selection.py), float64 throughout took 5 times as long."""
    block = math.gcd(terms.shape[-1], BLOCK)
    return terms.unflatten(-1, (-1, block)).sum(-1).double().sum(-1)


def p_log_q(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p log q per token (float64), a term with p = 0 adding 0 even where log q = -inf (0 x -inf would
    be NaN). Overwrites `log_q` with the terms, which saves a second buffer of a chunk's size."""
    sums = vocab_sums(log_q.mul_(p))
    undefined = sums.isnan()
    if undefined.any():
        sums[undefined] = vocab_sums(torch.where(p[undefined] > 0, log_q[undefined], 0.0))
    return sums


@dataclass
class Reference:
    """The dense model's distribution on one chunk of the KL set: p, and per token sum_v p log p (float64), the
    half of KL(p || q) = sum_v p log p - sum_v p log q that no plan changes, so it is computed once."""

    p: torch.Tensor
    p_log_p: torch.Tensor

    @classmethod
    def of(cls, log_p: torch.Tensor) -> Reference:
        """From the chunk's dense log-probabilities, which it overwrites."""
        p = log_p.exp()
        return cls(p, p_log_q(p, log_p))

    def kl_sum(self, log_q: torch.Tensor) -> float:
        """KL(p || q) summed over the chunk's tokens; overwrites `log_q` (`p_log_q`)."""
        return (self.p_log_p - p_log_q(self.p, log_q)).sum().item()


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two sets of named tensors are equal: the same names, dtypes, shapes and values."""
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


def outside(model: nn.Module, layers: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors no layer holds: embeddings, rotary frequencies, final norm, head."""
    inside = {id(t) for layer in layers for t in tensors(layer).values()}
    return {name: t for name, t in tensors(model).items() if id(t) not in inside}


def shared_layers(model: PreTrainedModel, dense: PreTrainedModel) -> list[nn.Module]:
    """The leading layers of `model` that hold the dense model's tensors, where everything outside the layers
    is the dense model's too: their outputs on the KL set are the dense model's, bit for bit. None for an
    encoder-decoder, whose layers pass more than hidden states to the next."""
    if is_seq2seq(model):
        return []
    adapter = get_adapter(model.config)
    mine, theirs = adapter.layers(model), adapter.layers(dense)
    if not same(outside(model, mine), outside(dense, theirs)):
        return []
    pairs = takewhile(lambda pair: same(tensors(pair[0]), tensors(pair[1])), zip(mine, theirs, strict=True))
    return [layer for layer, _ in pairs]


@contextmanager
def skipping(layers: list[nn.Module], output: torch.Tensor | None) -> Iterator[None]:
    """Let `layers` answer `output` (what the last of them returned on this chunk before) without computing,
    the model's forward going on from there; then give each its own forward back (accelerate's, if any)."""
    own = [vars(layer).get("forward") for layer in layers]
    for layer in layers:
        setattr(layer, "forward", lambda *args, **kwargs: output)  # noqa: B010 (an instance attribute, on purpose)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                delattr(layer, "forward")
            else:
                setattr(layer, "forward", forward)  # noqa: B010


@contextmanager
def recording(layers: list[nn.Module], outputs: list[torch.Tensor]) -> Iterator[None]:
    """Append to `outputs` what the last of `layers` returns, if a tensor (`skipping` replays nothing else)."""
    if not layers:
        yield
        return

    def keep(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output)

    handle = layers[-1].register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class HeldOut:
    """The held-out KL set with the dense model's distributions on it, computed once, and the outputs of the
    leading layers that plans leave as the dense model has them (by how many), recorded by the first plan
    that runs them and replayed for the next: the dense model must stay as it is, as `reference` already
    requires."""

    windows: torch.Tensor
    reference: list[Reference]
    batch_size: int
    dense: PreTrainedModel | None = None
    prefixes: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, dense: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> HeldOut:
        reference = [Reference.of(log_p) for log_p in log_probs(dense, windows, batch_size)]
        return cls(windows, reference, batch_size, dense)

    @torch.no_grad()
    def kl(self, model: PreTrainedModel) -> float:
        """KL(P_dense || Q_model) = sum_v p (log p - log q), averaged over every token of the KL set."""
        layers = shared_layers(model, self.dense) if self.dense is not None else []
        start = max((k for k in self.prefixes if k <= len(layers)), default=0)
        recorded: list[torch.Tensor] = []
        total, tokens = 0.0, 0
        for i, (reference, windows) in enumerate(zip(self.reference, self.windows.split(self.batch_size), strict=True)):
            replay = self.prefixes[start][i] if start else None
            with skipping(layers[:start], replay), recording(layers[start:], recorded):
                total += reference.kl_sum(chunk_log_probs(model, windows))
            tokens += reference.p_log_p.numel()
        if len(recorded) == len(self.reference):
            self.prefixes[len(layers)] = recorded
        return total / tokens


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
