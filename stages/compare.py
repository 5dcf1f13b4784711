"""Stage compare: dense and pruned side by side: size, peak memory, measured and ideal speedup
(the fine-tuned model has the pruned shapes), and one row per model of quality metrics for the plots.
The clock's figures go to their own file, with the machine that made them (nirvana.evaluation.timings); they are taken
on the machine's own CPU kernels, as users deploy (`efficiency.native_report`)."""

import json
from pathlib import Path

import pandas as pd
import torch

from nirvana.core.environment import machine
from nirvana.core.io import folder_digest, log, write_csv, write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.evaluation.efficiency import native_report
from nirvana.evaluation.timings import split
from nirvana.pipeline.checks import check_model


def main(
    params: Params,
    dense_dir: str,
    pruned_dir: str,
    dense_metrics: str,
    pruned_metrics: str,
    finetuned_metrics: str,
    out: str,
    timings_out: str,
    plot_out: str,
) -> None:
    run = ("efficiency.prompt_len + efficiency.new_tokens", params.efficiency.prompt_len + params.efficiency.new_tokens)
    for folder in (dense_dir, pruned_dir):
        check_model(folder, [run], tokenizer=False)
    report = native_report(dense_dir, pruned_dir, params.model, params.efficiency, torch.get_num_threads())
    torch_cpu = report.pop("torch_cpu")
    report["pruned_digest"] = folder_digest(pruned_dir)  # which pruned model these speedups are about
    results, timed = split(report)
    write_json(results, out)
    write_json(timed | {"machine": machine() | {"torch_cpu": torch_cpu}}, timings_out)
    rows = [
        {"model": name, **json.loads(Path(path).read_text())}
        for name, path in (("dense", dense_metrics), ("pruned", pruned_metrics), ("finetuned", finetuned_metrics))
    ]
    write_csv(pd.DataFrame(rows), plot_out)
    speedups = {k: v for k, v in report.items() if k.startswith("speedup_")}
    log.info(
        "wrote %s and %s: %s",
        out,
        timings_out,
        ", ".join(f"{k.removeprefix('speedup_')} x{v}" for k, v in speedups.items()),
    )


if __name__ == "__main__":
    run_stage("compare", main)
