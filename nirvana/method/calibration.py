"""KL-divergence calibration selection (method §3): among seeded candidate calibration sets,
keep the one whose pruned model shifts the output distribution least on a held-out KL set."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nirvana.core.data import bos_id, dataset_texts, hold_out, token_stream, user_windows, windows
from nirvana.core.errors import InputError
from nirvana.core.io import atomic_path
from nirvana.core.params import CalibrationParams, Params
from nirvana.method.criteria import CRITERIA
from nirvana.method.kl import HeldOut
from nirvana.method.saliency import enable_checkpointing
from nirvana.method.selection import select_plan


def kl_set(c: CalibrationParams, tokenizer: PreTrainedTokenizerBase, builtin_texts: list[str]) -> torch.Tensor:
    """The held-out KL set: `kl_samples` windows from the built-in pool's tail, never drawn from."""
    return hold_out(token_stream(builtin_texts, tokenizer), c.kl_samples, c.kl_seq_len, bos_id(tokenizer))[1]


def candidate_pool(
    c: CalibrationParams,
    tokenizer: PreTrainedTokenizerBase,
    builtin_texts: list[str],
    user_file: str | None = None,
    *,
    overlap_ngram: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows candidates are drawn from (the built-in pool less its tail, a user's file or a
    dataset), and the held-out KL set (`kl_set`). A user's texts lose the passages sharing a word
    `overlap_ngram`-gram (data.overlap_ngram) with the evaluation texts, as the built-in pool did."""
    bos = bos_id(tokenizer)
    stream, kl_windows = hold_out(token_stream(builtin_texts, tokenizer), c.kl_samples, c.kl_seq_len, bos)
    if user_file:
        return user_windows(user_file, tokenizer, c.seq_len, overlap_ngram), kl_windows
    if c.source:
        stream = token_stream(dataset_texts(c.source, overlap_ngram), tokenizer)
    pool = windows(stream, c.seq_len, bos)
    check_draw(pool, c.num_samples)  # before the stage loads the model
    return pool, kl_windows


def check_draw(pool: torch.Tensor, num_samples: int) -> None:
    """The pool holds the `num_samples` windows a candidate draws: a params value the data cannot meet."""
    if num_samples > len(pool):
        raise InputError(
            f"params: calibration.num_samples = {num_samples} exceeds the {len(pool)} windows available in the "
            f"calibration pool (of {pool.shape[-1]} tokens each, calibration.seq_len)"
        )


def draw(pool: torch.Tensor, num_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw, without replacement, of `num_samples` pool windows."""
    check_draw(pool, num_samples)
    return np.sort(np.random.default_rng(seed).choice(len(pool), size=num_samples, replace=False))


def resume_key(model_digest: str, code: str, pool: torch.Tensor, kl_windows: torch.Tensor, params: Params) -> str:
    """Hash of everything a candidate's row depends on, its code (`nirvana.core.io.code_digest`) included but not the
    number of candidates, so that finished candidates are reused only by the same search, or one that asks for more."""
    settings = {k: v for k, v in dataclasses.asdict(params).items() if k not in ("finetune", "evaluate", "export")}
    settings["calibration"].pop("candidates")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode() + model_digest.encode())
    digest.update(code.encode())
    for tensor in (pool, kl_windows):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def finished_candidates(folder: Path | None) -> dict[int, dict]:
    """The candidate rows an interrupted search saved in `folder` (`candidate-<i>.json`), by candidate."""
    if folder is None or not folder.is_dir():
        return {}
    rows = (json.loads(path.read_text()) for path in folder.glob("candidate-*.json"))
    return {row["candidate"]: row for row in rows}


def judging_run(params: Params) -> Params:
    """The run each candidate set is judged by: with `gamma: auto`, the middle of
    allocation.gamma_candidates, one gamma as the release judges at its own; allocate_sparsity then
    chooses gamma for the winning set alone (results/gamma_search.md: the same choice on the recorded grids)."""
    if params.gamma != "auto":
        return params
    grid = params.allocation.gamma_candidates  # increasing (params checks it)
    return dataclasses.replace(params, gamma=float(grid[len(grid) // 2]))


def search_candidates(
    model: PreTrainedModel,
    pool: torch.Tensor,
    kl_windows: torch.Tensor,
    params: Params,
    measure: Callable[[PreTrainedModel], dict] | None = None,
    checkpoints: Path | None = None,
) -> pd.DataFrame:
    """One row per candidate: candidate, seed, kl, the method, gamma and plan digest of its best plan,
    the sparsity it was judged at, windows (pool indices), selected; plus what `measure` reports on that
    plan's pruned model (benchmarks use it). Each finished row is saved in `checkpoints`, and rows found
    there are not computed again.

    A candidate is judged by the plan the run would make from it at one gamma (`judging_run`): with several
    criteria, the lowest-KL one of `nirvana.method.selection.candidate_runs` (saliency once per criterion)."""
    c = params.calibration
    sparsity = params.sparsity if c.select_at_sparsity is None else c.select_at_sparsity
    finished = finished_candidates(checkpoints)
    held_out = HeldOut.of(model, kl_windows, c.kl_batch_size) if len(finished) < c.candidates else None
    if params.saliency.gradient_checkpointing:
        enable_checkpointing(model)
    rows = []
    for candidate in tqdm(range(c.candidates), desc="candidates", unit="set"):
        if candidate in finished:
            rows.append(finished[candidate])
            continue
        seed = c.seed + candidate
        picks = draw(pool, c.num_samples, seed)
        picked = pool[torch.from_numpy(picks)]
        scores = {m: CRITERIA[m](model, picked, params.saliency.batch_size) for m in params.methods}
        _, plans = select_plan(model, scores, judging_run(params), sparsity, picked, held_out, measure)
        best = plans[plans["selected"]].iloc[0].drop(["selected", "allocation"])
        rows.append(
            {
                "candidate": candidate,
                "seed": seed,
                **best.to_dict(),
                "search_sparsity": sparsity,
                "windows": picks.tolist(),
            }
        )
        if checkpoints is not None:  # in the row's own key order: the table's columns come from it
            with atomic_path(checkpoints / f"candidate-{candidate}.json") as tmp:
                tmp.write_text(json.dumps(rows[-1]))
    table = pd.DataFrame(rows)
    table["selected"] = table.index == int(table["kl"].idxmin())
    return table


def search_winner(table: pd.DataFrame, sparsity: float) -> pd.DataFrame | None:
    """The winning set's judged plan and its KL (one row of the candidates table), for allocate_sparsity
    to reuse when the search ran at its sparsity; None after no search (one candidate) or another sparsity."""
    winner = table[table["selected"]]
    if "plan_digest" not in table or winner["kl"].isna().all() or winner["search_sparsity"].iloc[0] != sparsity:
        return None
    return winner


def select_windows(
    model: PreTrainedModel | None,
    pool: torch.Tensor,
    kl_windows: torch.Tensor,
    params: Params,
    verbatim: bool = False,
    checkpoints: Path | None = None,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """The selected windows and the candidates table (a search resumes from `checkpoints`).

    With one candidate there is no search: a seeded draw, or the whole pool if `verbatim`."""
    c = params.calibration
    if c.candidates == 1:
        picks = np.arange(len(pool)) if verbatim else draw(pool, c.num_samples, c.seed)
        row = {"candidate": 0, "seed": c.seed, "kl": float("nan"), "windows": picks.tolist(), "selected": True}
        return pool[torch.from_numpy(picks)], pd.DataFrame([row])
    assert model is not None, "a search needs the dense model"
    table = search_candidates(model, pool, kl_windows, params, checkpoints=checkpoints)
    return pool[torch.tensor(table.loc[table["selected"], "windows"].iloc[0])], table


def calibration_metrics(table: pd.DataFrame) -> dict[str, float | int]:
    """metrics/calibration.json: the winning set's KL against the median and worst candidate."""
    kl = table["kl"].dropna()
    if kl.empty:  # one candidate: nothing was measured
        return {"candidates": len(table)}
    return {
        "candidates": len(table),
        "kl_selected": float(table.loc[table["selected"], "kl"].iloc[0]),
        "kl_median": float(kl.median()),
        "kl_worst": float(kl.max()),
    }
