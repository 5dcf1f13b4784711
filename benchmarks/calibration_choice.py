"""Does KL selection pick a good calibration set? For each sparsity, run the candidate search
on the pipeline's base model and pool, and measure every pruned candidate's wiki perplexity.

Run after `make run` (it reads outputs/base_model and outputs/corpora):
    .venv/bin/python benchmarks/calibration_choice.py --sparsities 0.2 0.4
Writes results/calibration_choice.json and results/calibration_choice.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from nirvana.core.data import read_texts, token_stream, windows
from nirvana.core.params import load_params
from nirvana.evaluation.perplexity import perplexity
from nirvana.method.calibration import candidate_pool, search_candidates
from nirvana.models.loading import load_model, load_tokenizer


def run(sparsity: float, seq_len: int = 128) -> dict:
    params = load_params()
    params = dataclasses.replace(
        params, sparsity=sparsity, calibration=dataclasses.replace(params.calibration, select_at_sparsity=None)
    )
    model, tokenizer = load_model("outputs/base_model"), load_tokenizer("outputs/base_model")
    builtin = read_texts("outputs/corpora/calibration.parquet")
    pool, kl_windows = candidate_pool(params.calibration, tokenizer, builtin, overlap_ngram=params.data.overlap_ngram)
    wiki = token_stream(read_texts("outputs/corpora/wiki.parquet"), tokenizer)
    wiki_windows = windows(wiki[: params.evaluate.max_tokens], seq_len)

    def measure(pruned) -> dict:
        return {f"ppl_wiki_{seq_len}": perplexity(pruned, wiki_windows, params.evaluate.batch_size)}

    table = search_candidates(model, pool, kl_windows, params, measure).drop(columns="windows")
    ranked = table.sort_values("kl").reset_index(drop=True)
    ppl = f"ppl_wiki_{seq_len}"
    return {
        "sparsity": sparsity,
        "ppl_column": ppl,
        "selected": ranked.iloc[0].to_dict(),
        "median": ranked.iloc[(len(ranked) - 1) // 2].to_dict(),  # the lower middle of an even count
        "worst": ranked.iloc[-1].to_dict(),
        "kl_ppl_spearman": float(table["kl"].corr(table[ppl], method="spearman")),
        "candidates": table.to_dict(orient="records"),
    }


def markdown(results: list[dict]) -> str:
    lines = ["| sparsity | candidate (by KL) | seed | KL | wiki ppl (128) |", "|---|---|---|---|---|"]
    for r in results:
        for which in ("selected", "median", "worst"):
            row = r[which]
            lines.append(
                f"| {r['sparsity']} | {which} | {int(row['seed'])} | {row['kl']:.4f} | {row[r['ppl_column']]:.2f} |"
            )
    lines.append("")
    lines += [
        f"Spearman correlation of KL and perplexity over {len(r['candidates'])} candidates at "
        f"sparsity {r['sparsity']}: {r['kl_ppl_spearman']:.2f}"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4])
    args = parser.parse_args()
    results = [run(s) for s in args.sparsities]
    Path("results").mkdir(exist_ok=True)
    Path("results/calibration_choice.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    Path("results/calibration_choice.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
