"""One Markdown table of all DVC experiments: settings, size, perplexity, accuracy, speedup."""

from __future__ import annotations

import json
import subprocess
import sys


def _files(data: dict, kind: str) -> dict:
    return {path: (content or {}).get("data", {}) for path, content in (data.get(kind) or {}).items()}


def _row(name: str, data: dict, model: str) -> dict:
    params = _files(data, "params").get("params.yaml", {})
    metrics = _files(data, "metrics")
    quality = metrics.get(f"metrics/{model}.json", {})
    pruned = model == "pruned"
    row = {
        "experiment": name,
        "method": params.get("method", "") if pruned else "dense",
        "sparsity": params.get("sparsity", "") if pruned else 0,
        "gamma": params.get("gamma", "") if pruned else "",
        "params": quality.get("params_total", ""),
    }
    row |= {k: v for k, v in quality.items() if k.startswith(("ppl_", "acc_"))}
    if pruned:
        efficiency = metrics.get("metrics/efficiency.json", {})
        row |= {k: v for k, v in efficiency.items() if k.startswith("speedup_")}
    return row


def experiment_rows(exp_show: list[dict]) -> list[dict]:
    """Rows from `dvc exp show --json`: the dense model once, then each commit and experiment."""
    commits = [c for c in exp_show if c.get("rev") != "workspace"] or exp_show
    rows = [_row("dense", commits[0]["data"], "dense")]
    for commit in commits:
        rows.append(_row(commit.get("name") or commit["rev"][:7], commit["data"], "pruned"))
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs", []):
                rows.append(_row(rev.get("name") or rev["rev"][:7], rev["data"], "pruned"))
    return rows


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
