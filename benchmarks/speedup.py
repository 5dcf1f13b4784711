"""Does pruning make SmolLM2 faster in practice? Dense vs NIRVANA-pruned prefill throughput and
generation latency at several sparsities, next to the ideal whole-forward FLOP ratio, at batch sizes
1 and 8; and the effect of rounding kept MLP widths (`allocation.mlp_multiple`) at the highest sparsity.
Dense and pruned are timed alternately in one process (nirvana.evaluation.efficiency.interleaved_timings). The
NIRVANA plans come from 8 calibration windows: only the pruned shapes matter for speed.

    .venv/bin/python benchmarks/speedup.py --sparsities 0.2 0.4 0.5 --multiples 1 8
Writes results/speedup.json and results/speedup.md."""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch

from nirvana.core.data import build_corpora, token_stream, windows
from nirvana.core.params import ModelParams, defaults
from nirvana.evaluation.efficiency import compare_speed, forward_flops
from nirvana.method.allocation import allocate_for_model
from nirvana.method.calibration import draw
from nirvana.method.saliency import nirvana_scores
from nirvana.method.surgery import layer_units, prune_model
from nirvana.models.loading import load_base

PROMPT, NEW_TOKENS, REPEATS = 128, 64, 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4, 0.5])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    dense, tokenizer = load_base(defaults(ModelParams))
    dense.eval()
    pool = windows(token_stream(build_corpora(13)["calibration"]["text"].tolist(), tokenizer), 128)
    scores = nirvana_scores(dense, pool[torch.from_numpy(draw(pool, 8, seed=0))], 4)  # plans for shapes only
    runs = [(s, 8) for s in args.sparsities] + [(max(args.sparsities), m) for m in args.multiples if m != 8]
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}
    report["runs"] = []
    for sparsity, multiple in runs:
        pruned = copy.deepcopy(dense)
        prune_model(pruned, allocate_for_model(dense, scores, sparsity, 3.0, multiple, "nirvana"))
        speed = compare_speed({"dense": dense, "pruned": pruned}, [1, 8], PROMPT, NEW_TOKENS, 1, REPEATS)
        ideal = forward_flops(dense, PROMPT) / forward_flops(pruned, PROMPT)
        row = {
            "sparsity": sparsity,
            "mlp_multiple": multiple,
            "mlp_widths": sorted({u["mlp"] for u in layer_units(pruned)}),
            "ideal_flop_ratio": round(ideal, 4),
        }
        for key, dense_ms in speed["dense"].items():
            if key.endswith("_ms"):
                row[f"speedup_{key.removesuffix('_ms')}"] = round(dense_ms / speed["pruned"][key], 4)
        row["prefill_bs8_over_ideal"] = round(row["speedup_prefill_bs8"] / ideal, 3)
        row["timings"] = speed
        report["runs"].append(row)
        print({k: v for k, v in row.items() if k not in ("timings", "mlp_widths")}, flush=True)
    Path("results").mkdir(exist_ok=True)
    Path("results/speedup.json").write_text(json.dumps(report, indent=2) + "\n")
    Path("results/speedup.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"Dense vs pruned SmolLM2-135M, {report['machine']}, prompt {PROMPT} tokens, {NEW_TOKENS} new tokens, "
        f"median of {REPEATS} alternating runs.",
        "",
        "| sparsity | mlp_multiple | ideal FLOP ratio | prefill bs1 | prefill bs8 | generate bs1 | generate bs8 "
        "| prefill bs8 / ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['sparsity']} | {r['mlp_multiple']} | x{r['ideal_flop_ratio']:.2f} | x{r['speedup_prefill_bs1']:.2f} "
            f"| x{r['speedup_prefill_bs8']:.2f} | x{r['speedup_generate_bs1']:.2f} | x{r['speedup_generate_bs8']:.2f} "
            f"| {r['prefill_bs8_over_ideal']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
