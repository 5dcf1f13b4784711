"""The method's claim after recovery: NIRVANA's pruned model against FLAP's, LLM-Pruner's and the Taylor
criterion under NIRVANA's allocation, each recovered with the same recipes and budget, at several sparsities.
Wiki and books perplexity (the evaluate stage's protocol), zero-shot accuracy (lm-eval, --limit examples a
task) and the share of each model's own dense-to-pruned wiki log-perplexity gap that recovery closes.

Every method prunes SmolLM2 from this workspace's dense model as the pipeline does with `method` (and for the
hybrid `allocation.mode`) set: its own calibration search, criterion, allocation (gamma by held-out KL where it
is auto) and surgery, then recovers as `finetune` does with each recipe. Each cell (a pruned model, or one recipe on
it) trains and evaluates in a child process of its own. Results are written after every cell and a rerun skips
the cells already there, so the table can be filled over several sittings.

Run after `make run`:
    .venv/bin/python benchmarks/recovery_methods.py --sparsities 0.2 0.4
Writes results/recovery_methods.json and results/recovery_methods.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import time
from pathlib import Path

from recovery import gap_closed, in_child

from nirvana.core.data import EVAL_SETS, read_texts
from nirvana.core.params import Params, load_params
from nirvana.evaluation.perplexity import held_out, perplexity
from nirvana.evaluation.zeroshot import zero_shot
from nirvana.method.calibration import candidate_pool, select_windows
from nirvana.method.criteria import CRITERIA
from nirvana.method.kl import HeldOut
from nirvana.method.selection import candidate_runs, select_plan
from nirvana.method.surgery import prune_model, save_model
from nirvana.models.loading import load_model, load_tokenizer
from nirvana.recovery.finetune import build_examples, load_rows, load_teacher, train

DENSE, CORPORA = "outputs/base_model", "outputs/corpora"
# name: (criterion, allocation mode; None = the criterion's own)
METHODS = {
    "nirvana": ("nirvana", None),
    "flap": ("flap", None),
    "llm_pruner": ("taylor", None),
    "taylor+nirvana_alloc": ("taylor", "nirvana"),
}
RECIPES = ["lm:lora:3e-3", "kd:lora:3e-3", "kd:full:5e-5"]


def method_params(params: Params, method: str, sparsity: float) -> Params:
    """The pipeline's params with this method's criterion and allocation at `sparsity`."""
    criterion, mode = METHODS[method]
    allocation = dataclasses.replace(params.allocation, mode=mode)
    return dataclasses.replace(params, method=criterion, sparsity=sparsity, allocation=allocation)


def prune_to(params: Params, folder: Path) -> dict:
    """Prune the dense model as the pipeline would with `params` (its own calibration search, saliency and
    allocation, gamma by held-out KL where it is auto) and save it to `folder`; the chosen plan's row."""
    model, tokenizer = load_model(DENSE, params.model), load_tokenizer(DENSE)
    builtin = read_texts(f"{CORPORA}/calibration.parquet")
    pool, kl_windows = candidate_pool(params.calibration, tokenizer, builtin, overlap_ngram=params.data.overlap_ngram)
    calibration, candidates = select_windows(model, pool, kl_windows, params)
    scores = {params.method: CRITERIA[str(params.method)](model, calibration, params.saliency.batch_size)}
    held_out = (
        HeldOut.of(model, kl_windows, params.calibration.kl_batch_size) if len(candidate_runs(params)) > 1 else None
    )
    plan, table = select_plan(model, scores, params, params.sparsity, calibration, held_out)
    prune_model(model, plan)
    save_model(model, tokenizer, folder)
    chosen = json.loads(table[table["selected"]].to_json(orient="records"))[0]
    return chosen | {"calibration_candidate": int(candidates.loc[candidates["selected"], "candidate"].iloc[0])}


def measure(model, tokenizer, params: Params, limit: int) -> dict:  # type: ignore[no-untyped-def]
    """Wiki and books perplexity as the evaluate stage cuts them, and zero-shot accuracy on `limit` examples a task."""
    e, out = params.evaluate, {}
    for name in EVAL_SETS:
        cut = held_out(CORPORA, name, tokenizer, e.max_tokens, 128)
        out[f"ppl_{name}_128"] = round(perplexity(model, cut, e.batch_size, desc=name), 3)
    accuracies, info = zero_shot(model, tokenizer, e.tasks, limit, e.batch_size)
    out |= {k: round(v, 4) for k, v in accuracies.items()}
    errors = [task["stderr"] for task in info["tasks"].values()]  # None where a task had one example (--limit 1)
    average_error = math.sqrt(sum(s * s for s in errors)) / len(errors) if None not in errors else None
    out["acc_average_stderr"] = None if average_error is None else round(average_error, 4)
    out["zero_shot_samples"] = {t: task["samples"] for t, task in info["tasks"].items()}
    return out


def run_cell(pruned: str, recipe: str | None, steps: int, limit: int, out: multiprocessing.Queue) -> None:
    """In a child process: the pruned model as it is (`recipe` None) or recovered by `loss:adapter:lr`, measured."""
    params = load_params()
    tokenizer, model = load_tokenizer(pruned), load_model(pruned, params.model, on="cpu")
    figures: dict = {}
    if recipe is not None:
        loss, adapter, lr = recipe.split(":")
        f = dataclasses.replace(
            params.finetune, loss=loss, adapter=adapter, lr=float(lr), steps=steps, save_steps=10**6
        )
        examples = build_examples(load_rows(f.path), tokenizer, f.seq_len)
        teacher = load_teacher(DENSE, params.model) if loss != "lm" else None
        start = time.perf_counter()
        tuned, summary = train(model, tokenizer, examples, f, Path(f"/tmp/recovery-methods-{recipe}"), [], teacher)
        assert tuned is not None  # one process: it is rank 0
        model = tuned
        figures = {"train_s": round(time.perf_counter() - start, 1), "tokens_seen": summary["tokens_seen"]}
    out.put(figures | measure(model, tokenizer, params, limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="loss:adapter:lr each")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of 4 x 128 tokens (the pipeline's)")
    parser.add_argument("--limit", type=int, default=100, help="zero-shot examples per task")
    parser.add_argument("--work", default="/tmp/nirvana-recovery-methods", help="where the pruned models go")
    parser.add_argument("--out", default="results/recovery_methods.json")
    args = parser.parse_args()
    params, path = load_params(), Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {}
    settings = {"steps": args.steps, "zero_shot_limit": args.limit}
    if results.get("settings", settings) != settings:
        raise SystemExit(f"{path} was measured with {results['settings']}, not {settings}: use another --out")
    results["settings"] = settings

    def save() -> None:
        path.write_text(json.dumps(results, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(render(results))

    if "dense" not in results:
        results["dense"] = in_child(run_cell, DENSE, None, 0, args.limit)
        save()
    for sparsity in args.sparsities:
        for method in args.methods:
            entry = results.setdefault(f"{method}@{sparsity}", {"recipes": {}})
            folder = Path(args.work) / f"{method}-{sparsity}"
            if not folder.is_dir():
                entry["plan"] = prune_to(method_params(params, method, sparsity), folder)
            for recipe in [None, *args.recipes]:
                key = recipe or "pruned"
                if key in entry["recipes"]:
                    continue
                started = time.perf_counter()
                figures = in_child(run_cell, str(folder), recipe, args.steps, args.limit)
                if recipe is not None:
                    dense, pruned = results["dense"]["ppl_wiki_128"], entry["recipes"]["pruned"]["ppl_wiki_128"]
                    figures["gap_closed"] = gap_closed(dense, pruned, figures["ppl_wiki_128"])
                figures["cell_s"] = round(time.perf_counter() - started, 1)
                entry["recipes"][key] = figures
                print(method, sparsity, key, json.dumps(figures), flush=True)
                save()
    save()  # re-rendered even when every cell was there already


def render(results: dict) -> str:
    """The table as markdown (a row per method, sparsity and recipe), the plans, and NIRVANA against each
    baseline after the same recipe."""
    s, cells = results["settings"], {k: v for k, v in results.items() if "@" in k}
    lines = [
        "# Recovery by method: NIRVANA against the baselines after the same recovery",
        "",
        f"Generated by `benchmarks/recovery_methods.py` ({s['steps']} optimiser steps of 4 x 128 tokens, "
        f"zero-shot on the first {s['zero_shot_limit']} examples of each of 7 tasks; gap = share of the method's "
        "own wiki log-perplexity gap to dense that recovery closes; train s = wall time of the training alone).",
        "",
        "| sparsity | method | recipe | wiki ppl | books ppl | zero-shot avg (+-se) | gap closed | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if "dense" in results:
        lines.append(row("0", "dense", "-", results["dense"]))
    for key, entry in cells.items():
        method, sparsity = key.split("@")
        lines += [row(sparsity, method, recipe, r) for recipe, r in entry["recipes"].items()]
    lines += ["", "Plans (each method's own calibration search and allocation):", ""]
    lines += [
        "| sparsity | method | allocation | gamma | calibration set | realised sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in cells.items():
        method, sparsity = key.split("@")
        if "plan" in entry:
            p = entry["plan"]
            lines.append(
                f"| {sparsity} | {method} | {p['allocation']} | {p['gamma'] if p['gamma'] is not None else '-'} | "
                f"candidate {p['calibration_candidate']} | {p['sparsity_realised']} |"
            )
    lines += [
        "",
        "NIRVANA against each baseline after the same recipe (perplexity ratio > 1: NIRVANA's is higher, "
        "worse; zero-shot difference < 0: NIRVANA's is lower, worse):",
        "",
    ]
    lines += [
        "| sparsity | recipe | baseline | wiki ratio | books ratio | zero-shot difference |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in cells.items():
        method, sparsity = key.split("@")
        ours = cells.get(f"nirvana@{sparsity}", {"recipes": {}})["recipes"]
        for recipe, r in entry["recipes"].items():
            if method != "nirvana" and recipe in ours:
                n = ours[recipe]
                lines.append(
                    f"| {sparsity} | {recipe} | {method} | x{n['ppl_wiki_128'] / r['ppl_wiki_128']:.3f} | "
                    f"x{n['ppl_books_128'] / r['ppl_books_128']:.3f} | {n['acc_average'] - r['acc_average']:+.3f} |"
                )
    return "\n".join(lines) + "\n"


def row(sparsity: str, method: str, recipe: str, r: dict) -> str:
    """One line of the main table."""
    error = "" if r["acc_average_stderr"] is None else f" (+-{r['acc_average_stderr']:.3f})"
    return (
        f"| {sparsity} | {method} | {recipe} | {r['ppl_wiki_128']} | {r['ppl_books_128']} | "
        f"{r['acc_average']:.3f}{error} | {r.get('gap_closed', '-')} | "
        f"{r.get('train_s', '-')} |"
    )


if __name__ == "__main__":
    main()
