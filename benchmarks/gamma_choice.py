"""Does held-out KL pick the right gamma? At one sparsity, prune the pipeline's base model at every gamma
of a wide grid, as `gamma: auto` does (nirvana.method.selection.select_plan, same saliency for every gamma), and
measure each pruned model's wiki and books perplexity next to its KL. Perplexity is computed here only:
the pipeline never looks at the evaluation texts when it chooses.

Run after `make run` (it reads outputs/base_model and outputs/corpora):
    .venv/bin/python benchmarks/gamma_choice.py --sparsity 0.3
Writes results/gamma_choice.json and results/gamma_choice.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import torch

from nirvana.core.data import read_texts, token_stream, windows
from nirvana.core.params import Params, load_params
from nirvana.evaluation.perplexity import perplexity
from nirvana.method.calibration import candidate_pool, draw
from nirvana.method.criteria import CRITERIA
from nirvana.method.kl import HeldOut
from nirvana.method.selection import select_plan
from nirvana.models.loading import load_model, load_tokenizer

GRID = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]
"""Wider than the default `allocation.gamma_candidates`, to see whether the optimum lies inside it."""


def settings(method: str, sparsity: float, mlp_multiple: int) -> Params:
    """params.yaml as the baseline sweep ran it (results/baselines.md), with `gamma: auto` over GRID."""
    params = load_params()
    allocation = dataclasses.replace(
        params.allocation, mode="nirvana", mlp_multiple=mlp_multiple, gamma_candidates=GRID
    )
    return dataclasses.replace(params, method=method, sparsity=sparsity, gamma="auto", allocation=allocation)


def run(method: str, sparsity: float, mlp_multiple: int, seq_len: int = 128) -> dict:
    params = settings(method, sparsity, mlp_multiple)
    c = params.calibration
    model, tokenizer = load_model("outputs/base_model"), load_tokenizer("outputs/base_model")
    builtin = read_texts("outputs/corpora/calibration.parquet")
    pool, kl_windows = candidate_pool(c, tokenizer, builtin, overlap_ngram=params.data.overlap_ngram)
    calibration = pool[torch.from_numpy(draw(pool, c.num_samples, c.seed))]  # the sweep's draw (candidates 1)
    evaluation = {
        name: windows(
            token_stream(read_texts(f"outputs/corpora/{name}.parquet"), tokenizer)[: params.evaluate.max_tokens],
            seq_len,
        )
        for name in ("wiki", "books")
    }

    measuring = [0.0]  # seconds spent on perplexities, not part of what gamma: auto costs

    def measure(pruned) -> dict:
        start = time.perf_counter()
        out = {
            f"ppl_{name}_{seq_len}": perplexity(pruned, w, params.evaluate.batch_size) for name, w in evaluation.items()
        }
        measuring[0] += time.perf_counter() - start
        return out

    start = time.perf_counter()
    scores = {method: CRITERIA[method](model, calibration, params.saliency.batch_size)}
    saliency_s = time.perf_counter() - start
    start = time.perf_counter()
    held_out = HeldOut.of(model, kl_windows, c.kl_batch_size)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    _, table = select_plan(model, scores, params, sparsity, calibration, held_out, measure)
    per_gamma = (time.perf_counter() - start - measuring[0]) / len(table)
    return {
        "method": method,
        "sparsity": sparsity,
        "mlp_multiple": mlp_multiple,
        "grid": GRID,
        "seconds": {"saliency": saliency_s, "kl_reference": reference_s, "per_gamma": per_gamma},
        "spearman_kl_wiki": float(table["kl"].corr(table[f"ppl_wiki_{seq_len}"], method="spearman")),
        "spearman_kl_books": float(table["kl"].corr(table[f"ppl_books_{seq_len}"], method="spearman")),
        "choices": table.to_dict(orient="records"),
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        table = pd.DataFrame(r["choices"])
        wiki, books = (c for c in table.columns if c.startswith("ppl_"))
        lines += [
            f"{r['method']} criterion, NIRVANA allocation, sparsity {r['sparsity']}, mlp_multiple {r['mlp_multiple']}:",
            "",
            "| gamma | attention units kept | MLP channels kept | held-out KL | wiki ppl (128) | books ppl (128) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in table.itertuples():
            mark = " (KL's pick)" if row.selected else ""
            lines.append(
                f"| {row.gamma:g}{mark} | {row.attn_kept}/{row.attn_dense} | {row.mlp_kept}/{row.mlp_dense} | "
                f"{row.kl:.4f} | {getattr(row, wiki):.2f} | {getattr(row, books):.2f} |"
            )
        best = table.loc[table[wiki].idxmin()]
        picked = table.loc[table["selected"]].iloc[0]
        lines += [
            "",
            f"Spearman(KL, wiki ppl) {r['spearman_kl_wiki']:.2f}, "
            f"Spearman(KL, books ppl) {r['spearman_kl_books']:.2f}. "
            f"KL picks gamma {picked.gamma:g} (wiki {picked[wiki]:.2f}); the best wiki perplexity on this grid is "
            f"gamma {best.gamma:g} ({best[wiki]:.2f}). Seconds on this machine: "
            f"saliency {r['seconds']['saliency']:.1f}, dense KL reference {r['seconds']['kl_reference']:.1f}, "
            f"each gamma's prune + KL {r['seconds']['per_gamma']:.1f}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--methods", nargs="+", default=["nirvana"])
    parser.add_argument("--mlp-multiple", type=int, default=8, help="8: as the baseline sweep ran")
    args = parser.parse_args()
    results = [run(m, args.sparsity, args.mlp_multiple) for m in args.methods]
    Path("results").mkdir(exist_ok=True)
    Path("results/gamma_choice.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    Path("results/gamma_choice.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
