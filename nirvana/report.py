"""One Markdown table of all DVC experiments: settings, size, perplexity, accuracy, speedup."""

from __future__ import annotations

import json
import subprocess
import sys

from nirvana.allocation import resolve_mode


def _files(data: dict, kind: str) -> dict:
    return {path: (content or {}).get("data", {}) for path, content in (data.get(kind) or {}).items()}


def _row(name: str, data: dict, model: str) -> dict:
    """One model of one run: `dense`, `pruned` or `finetuned` (the pruned model after LoRA)."""
    params = _files(data, "params").get("params.yaml", {})
    metrics = _files(data, "metrics")
    quality = metrics.get(f"metrics/{model}.json", {})
    if model == "dense":
        row = {"experiment": name, "method": "dense", "allocation": "", "sparsity": 0, "realised": 0}
    else:
        method = params.get("method", "")
        prune = metrics.get("metrics/prune.json", {})
        row = {
            "experiment": name,
            "method": method + (" + LoRA" if model == "finetuned" else ""),
            "allocation": resolve_mode(method, (params.get("allocation") or {}).get("mode")),
            "sparsity": params.get("sparsity", ""),
            "realised": prune.get("sparsity_realised", ""),
        }
    row["zero-shot limit"] = (params.get("evaluate") or {}).get("limit", "")
    row["params"] = quality.get("params_total", "")
    row |= {k: v for k, v in quality.items() if k.startswith(("ppl_", "acc_"))}
    efficiency = metrics.get("metrics/efficiency.json", {})
    if model != "dense" and efficiency.get("pruned_digest") == metrics.get("metrics/pruned.json", {}).get(
        "model_digest"
    ):
        row |= {k: v for k, v in efficiency.items() if k.startswith("speedup_")}
    return row


def _run_rows(name: str, data: dict) -> list[dict]:
    """The pruned model of a run, and its fine-tuned version when the run trained one. A sweep that
    stops at evaluate@pruned leaves older fine-tuning and speed metrics behind: their model digests
    then differ from the pruned model's, and they are left out."""
    metrics = _files(data, "metrics")
    if "metrics/pruned.json" not in metrics:  # still running, queued or failed
        return []
    rows = [_row(name, data, "pruned")]
    finetune = metrics.get("metrics/finetune.json", {})
    if finetune.get("steps") and finetune.get("base_digest") == metrics.get("metrics/pruned.json", {}).get(
        "model_digest"
    ):
        rows.append(_row(name, data, "finetuned"))
    return rows


def experiment_rows(exp_show: list[dict]) -> list[dict]:
    """Rows from `dvc exp show --json`: the dense model once per distinct evaluation (a sweep at
    other `evaluate` settings measures it again), then each commit and experiment."""
    commits = [c for c in exp_show if c.get("rev") != "workspace"] or exp_show
    runs = [(c.get("name") or c["rev"][:7], c["data"]) for c in commits]
    for commit in commits:
        for experiment in commit.get("experiments") or []:
            runs += [(rev.get("name") or rev["rev"][:7], rev["data"]) for rev in experiment.get("revs", [])]
    dense: dict[str, dict] = {}
    for name, data in runs:
        if "metrics/dense.json" not in _files(data, "metrics"):
            continue
        row = _row(name, data, "dense")
        dense.setdefault(json.dumps({k: v for k, v in row.items() if k != "experiment"}, sort_keys=True), row)
    return list(dense.values()) + [row for name, data in runs for row in _run_rows(name, data)]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value > 100_000:  # parameter counts
        return f"{value / 1e6:.1f} M"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """A Markdown table with every column any row has, in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report() -> str:
    """Run `dvc exp show --json` here and render it."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True
    ).stdout
    return markdown(experiment_rows(json.loads(out)))
