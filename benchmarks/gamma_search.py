"""Is the cheaper search the same search? For every candidate calibration set of the pipeline's search
(params.yaml: calibration.candidates seeded draws) and each sparsity, prune at every gamma of
allocation.gamma_candidates and record the held-out KL: the full grid the search and allocation used to
walk (27 + 9 pruned forward passes at the defaults). Then replay, on these recorded numbers, what the
pipeline does now: each candidate judged at one gamma (nirvana.method.calibration.judging_run), and gamma chosen
for the winner alone by nirvana.method.selection.coarse_to_fine. Same choice, or how much KL the cheaper search
gives up.

Run after `make run` (it reads outputs/base_model and outputs/corpora; about 5 minutes per sparsity on
2 cores):
    .venv/bin/python benchmarks/gamma_search.py --sparsities 0.2 0.3 0.4
Writes results/gamma_search.json and results/gamma_search.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from nirvana.core.data import read_texts
from nirvana.core.params import load_params
from nirvana.method.calibration import candidate_pool, draw, judging_run
from nirvana.method.criteria import CRITERIA
from nirvana.method.kl import HeldOut
from nirvana.method.selection import coarse_to_fine, select_plan
from nirvana.models.loading import load_model, load_tokenizer


def record(sparsities: list[float]) -> dict:
    """KL of every (sparsity, candidate, gamma) at the committed params, one pruned forward pass each."""
    params = load_params()
    c, grid = params.calibration, sorted(params.allocation.gamma_candidates)
    model = load_model("outputs/base_model", params.model)
    tokenizer, builtin = load_tokenizer("outputs/base_model"), read_texts(c.path)
    pool, kl_windows = candidate_pool(c, tokenizer, builtin, overlap_ngram=params.data.overlap_ngram)
    held_out = HeldOut.of(model, kl_windows, c.kl_batch_size)
    kl: dict = {str(s): {} for s in sparsities}
    start = time.perf_counter()
    for candidate in range(c.candidates):
        windows = pool[torch.from_numpy(draw(pool, c.num_samples, c.seed + candidate))]
        scores = {str(params.method): CRITERIA[str(params.method)](model, windows, params.saliency.batch_size)}
        for s in sparsities:
            runs = [dataclasses.replace(params, gamma=g) for g in grid]  # one choice each: its KL
            kl[str(s)][str(candidate)] = [
                float(select_plan(model, scores, r, s, windows, held_out)[1]["kl"][0]) for r in runs
            ]
    return {"method": params.method, "grid": grid, "kl": kl, "seconds": time.perf_counter() - start}


def replay(recorded: dict) -> list[dict]:
    """Per sparsity: the full grid's choice (every candidate at every gamma) against the pipeline's."""
    params, grid = load_params(), recorded["grid"]
    auto = dataclasses.replace(
        params, gamma="auto", allocation=dataclasses.replace(params.allocation, gamma_candidates=grid)
    )
    judge = grid.index(judging_run(auto).gamma)
    rows = []
    for sparsity, by_candidate in recorded["kl"].items():
        table = {int(c): kl for c, kl in by_candidate.items()}
        full = min(((kl[g], c, g) for c, kl in table.items() for g in range(len(grid))))
        winner = min(table, key=lambda c: (table[c][judge], c))
        visited = coarse_to_fine(len(grid), table[winner].__getitem__)
        gamma = min(visited, key=lambda g: (visited[g], g))
        plans = len(table) + len(visited) - (judge in visited)
        rows.append(
            {
                "sparsity": float(sparsity),
                "full": {
                    "candidate": full[1],
                    "gamma": grid[full[2]],
                    "kl": full[0],
                    "plans": len(table) * len(grid) + len(grid),
                },
                "now": {"candidate": winner, "gamma": grid[gamma], "kl": visited[gamma], "plans": plans},
            }
        )
    return rows


def markdown(recorded: dict, rows: list[dict]) -> str:
    lines = [
        f"{recorded['method']} criterion, params.yaml otherwise; gamma grid {recorded['grid']}; "
        f"{recorded['seconds'] / 60:.1f} min to record every KL.",
        "",
        "| sparsity | full grid: candidate, gamma, KL | passes | now: candidate, gamma, KL | passes | same |",
        "|---:|---|---:|---|---:|---|",
    ]
    for r in rows:
        f, n = r["full"], r["now"]
        same = (
            "yes"
            if (f["candidate"], f["gamma"]) == (n["candidate"], n["gamma"])
            else f"no (KL +{n['kl'] - f['kl']:.4f})"
        )
        lines.append(
            f"| {r['sparsity']} | {f['candidate']}, {f['gamma']:g}, {f['kl']:.4f} | {f['plans']} | "
            f"{n['candidate']}, {n['gamma']:g}, {n['kl']:.4f} | {n['plans']} | {same} |"
        )
    lines += ["", "KL per candidate (rows) and gamma (columns):", ""]
    for sparsity, by_candidate in recorded["kl"].items():
        lines += [f"sparsity {sparsity}:", "", "| candidate | " + " | ".join(f"{g:g}" for g in recorded["grid"]) + " |"]
        lines.append("|---:|" + "---:|" * len(recorded["grid"]))
        lines += [f"| {c} | " + " | ".join(f"{k:.4f}" for k in kl) + " |" for c, kl in by_candidate.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--replay", action="store_true", help="only replay results/gamma_search.json")
    args = parser.parse_args()
    out = Path("results/gamma_search.json")
    recorded = json.loads(out.read_text())["recorded"] if args.replay else record(args.sparsities)
    rows = replay(recorded)
    out.write_text(json.dumps({"recorded": recorded, "replay": rows}, indent=1) + "\n")
    Path("results/gamma_search.md").write_text(markdown(recorded, rows))
    print(markdown(recorded, rows))


if __name__ == "__main__":
    main()
