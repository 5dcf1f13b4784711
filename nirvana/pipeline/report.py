"""Markdown tables of results: one table with a row per model per DVC experiment and the best pruned run under it
(`nirvana report`), and the README's table of the committed run, made from metrics/ so that the README cannot drift
from the lock."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from nirvana.core.errors import InputError
from nirvana.core.params import BUILTIN_CORPUS
from nirvana.evaluation.timings import with_timings
from nirvana.method.allocation import resolve_mode
from nirvana.pipeline.sweep import dvc, dvc_error

DATA_FILES = (".parquet", ".jsonl")
# The settings columns in order; those in WIDE only with `--all`, which also adds each task's accuracy and the speedups.
ORDER = [
    "experiment",
    "model",
    "alloc",
    "gamma",
    "sparsity",
    "calibration",
    "finetune data",
    "ppl tokens",
    "zs limit",
    "params",
]
WIDE = {"alloc", "gamma", "params"}


def _files(data: dict, kind: str) -> dict:
    return {path: (content or {}).get("data", {}) for path, content in (data.get(kind) or {}).items()}


def _data_label(path: str | None, source: str | None) -> str:
    """Where the text came from, short enough for a cell: `built-in`, a file's name, or a Hugging Face id."""
    if source:
        return str(source)
    if not path or Path(path).as_posix() == BUILTIN_CORPUS:  # prepare_data's pool; older params said null
        return "built-in"
    return Path(path).name if Path(path).suffix in DATA_FILES else str(path)


def calibration_label(params: dict) -> str:
    """What the calibration candidates were drawn from (`calibration.path` or `calibration.source`)."""
    section = params.get("calibration") or {}
    return _data_label(section.get("path"), section.get("source"))


def recovery_name(params: dict) -> str:
    """' + LoRA' for next-token LoRA (all runs before finetune.loss and finetune.adapter); else e.g. ' + full kd'."""
    f = params.get("finetune") or {}
    loss = f.get("loss", "lm")
    return f" + {'full' if f.get('adapter') == 'full' else 'LoRA'}" + ("" if loss == "lm" else f" {loss}")


def finetune_label(params: dict) -> str:
    """The fine-tuning text: `finetune.path` or `finetune.source`; older runs had one `finetune.dataset`,
    null for the built-in corpus, else a file or a Hugging Face id."""
    section = params.get("finetune") or {}
    return _data_label(section.get("path") or section.get("dataset"), section.get("source"))


def _count(section: dict, key: str) -> object:
    """A token or example count: `all` for null (the whole set), blank where the run predates the key."""
    if key not in section:
        return ""
    return "all" if section[key] is None else section[key]


def _evaluation(params: dict) -> dict:
    """How a row was measured: the counts it shows, and a hidden key of what makes its numbers comparable (every
    `evaluate` setting but batch_size, and the base model, whose tokenizer perplexity is counted in)."""
    section = params.get("evaluate") or {}
    alike = {k: v for k, v in section.items() if k != "batch_size"}
    alike["model"] = (params.get("model") or {}).get("name_or_path")
    return {
        "ppl tokens": _count(section, "max_tokens"),
        "zs limit": _count(section, "limit"),
        "_measured": json.dumps(alike, sort_keys=True),
    }


def plan_labels(params: dict, plan: dict) -> tuple[str, str, str]:
    """(criterion, allocation, gamma) of a pruned run as cells: a searched criterion or gamma shows what won,
    `nirvana|taylor -> taylor`, `auto -> 6.0` (from metrics/plan.json); gamma only where the allocation has one."""
    method, gamma = params.get("method", ""), params.get("gamma", "")
    chosen = plan.get("method", method if isinstance(method, str) else "?")
    label = f"{'|'.join(method)} -> {chosen}" if isinstance(method, list) else method
    alloc = resolve_mode(chosen, (params.get("allocation") or {}).get("mode"))
    if alloc != "nirvana":
        return label, alloc, ""
    return label, alloc, f"auto -> {plan.get('gamma', '?')}" if gamma == "auto" else str(gamma)


# the metrics file of the stage that made each model, whose digest evaluate's numbers must carry
MADE_BY = {"pruned": "metrics/prune.json", "finetuned": "metrics/finetune.json"}


def measured(metrics: dict, model: str) -> bool:
    """Whether metrics/<model>.json measured this run's own model: a run stopped before `evaluate` (say at
    `prune`) leaves an earlier run's numbers there. Runs older than the digest in prune.json pass."""
    made = metrics.get(MADE_BY.get(model, ""), {}).get("model_digest")
    return made is None or made == metrics.get(f"metrics/{model}.json", {}).get("model_digest")


def pruned_digest(metrics: dict) -> str | None:
    """This run's pruned model: the digest prune wrote, or for older runs the one evaluate@pruned measured."""
    made = metrics.get("metrics/prune.json", {}).get("model_digest")
    return made or metrics.get("metrics/pruned.json", {}).get("model_digest")


def _row(name: str, data: dict, model: str) -> dict:
    """One model of one run: `dense`, `pruned` or `finetuned` (the pruned model after LoRA); no quality
    numbers when evaluate did not measure this run's model (`measured`)."""
    params = _files(data, "params").get("params.yaml", {})
    metrics = with_timings(_files(data, "metrics"))
    ours = measured(metrics, model)
    quality = metrics.get(f"metrics/{model}.json", {}) if ours else {}
    row: dict = {"experiment": name, "_sparsity": params.get("sparsity", "") if model != "dense" else 0}
    if model == "dense":
        row |= {"model": "dense", "sparsity": 0, "calibration": "", "finetune data": "", "alloc": "", "gamma": ""}
    else:
        method, alloc, gamma = plan_labels(params, metrics.get("metrics/plan.json", {}))
        realised = metrics.get("metrics/prune.json", {}).get("sparsity_realised")
        row |= {
            "model": method
            + (recovery_name(params) if model == "finetuned" else "")
            + ("" if ours else " (not evaluated)"),
            "sparsity": f"{params.get('sparsity', '')}" + (f" ({realised:.4f})" if realised is not None else ""),
            "calibration": calibration_label(params),
            "finetune data": finetune_label(params) if model == "finetuned" else "",
            "alloc": alloc,
            "gamma": gamma,
        }
    row |= _evaluation(params) | {"params": quality.get("params_total", "")}
    row |= {k: v for k, v in quality.items() if k.startswith(("ppl_", "acc_"))}
    efficiency = metrics.get("metrics/efficiency.json", {})
    if model != "dense" and efficiency.get("pruned_digest") == pruned_digest(metrics):
        row |= {k: v for k, v in efficiency.items() if k.startswith("speedup_")}
    return row | _llamacpp(metrics, model)


def _llamacpp(metrics: dict, model: str) -> dict:
    """llama.cpp speedups of a pruned or fine-tuned row per GGUF type (`speedup_llamacpp_q8_0_gen`), when
    metrics/gguf.json is about this run's pruned model."""
    gguf = metrics.get("metrics/gguf.json", {})
    if model == "dense" or gguf.get("pruned_digest") != pruned_digest(metrics):
        return {}
    out = {}
    for type, by_model in gguf.items():
        if isinstance(by_model, dict) and f"{model}_gen_speedup" in by_model:
            for kind in ("prompt", "gen"):
                out[f"speedup_llamacpp_{type}_{kind}"] = by_model[f"{model}_{kind}_speedup"]
    return out


def _run_rows(name: str, data: dict) -> list[dict]:
    """The pruned model of a run, and its fine-tuned version when the run trained one. A sweep that
    stops at evaluate@pruned leaves older fine-tuning and speed metrics behind: their model digests
    then differ from the pruned model's, and they are left out."""
    metrics = with_timings(_files(data, "metrics"))
    if "metrics/pruned.json" not in metrics:  # still running, queued or failed
        return []
    rows = [_row(name, data, "pruned")]
    finetune = metrics.get("metrics/finetune.json", {})
    if finetune.get("steps") and finetune.get("base_digest") == pruned_digest(metrics):
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


def _rank(key: str) -> tuple:
    """Column order of the metrics: perplexities (wiki first, then by set and window), the zero-shot average, each
    task, the speedups."""
    if key.startswith("ppl_"):
        name, _, window = key[4:].rpartition("_")
        return (0, name != "wiki", name, int(window) if window.isdigit() else 0)
    return (1, "") if key == "acc_average" else (2 if key.startswith("acc_") else 3, key)


def _metrics(rows: list[dict]) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith(("ppl_", "acc_", "speedup_"))}, key=_rank)


def columns(rows: list[dict], wide: bool = False) -> list[str]:
    """What the runs differ in and how they were measured, then the perplexities and the zero-shot average; `wide`
    adds the allocation, parameter counts, each task's accuracy and the speedups."""
    keys = {k for row in rows for k in row}
    settings = [c for c in ORDER if c in keys and (wide or c not in WIDE)]
    return settings + [m for m in _metrics(rows) if wide or m.startswith("ppl_") or m == "acc_average"]


def _line(cells: list[str], widths: list[int], right: list[bool]) -> str:
    return (
        "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)) + " |"
    )


def markdown(rows: list[dict], wide: bool = False) -> str:
    """A Markdown table padded into aligned columns (numbers to the right), readable in a terminal as it is."""
    names = columns(rows, wide)
    lines = [names, *([_cell(row.get(c, "")) for c in names] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(names))]
    right = [c == "params" or c in _metrics(rows) for c in names]
    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([_line(lines[0], widths, right), rule, *(_line(line, widths, right) for line in lines[1:])]) + "\n"


def _key(row: dict, column: str) -> tuple:
    """Best first: perplexities ascending, accuracies and speedups descending, rows without the column last."""
    value = row.get(column)
    if not isinstance(value, int | float):
        return (1, 0.0)
    return (0, value if column.startswith("ppl_") else -value)


def sort_rows(rows: list[dict], column: str) -> list[dict]:
    """Best first on a metric column; the dense rows stay on top as the reference."""
    metrics = _metrics(rows)
    if column not in metrics:
        raise ValueError(f"no metric column {column!r} to sort by; the table has: {', '.join(metrics) or 'none'}")
    runs = sorted((r for r in rows if r["model"] != "dense"), key=lambda r: _key(r, column))
    return [r for r in rows if r["model"] == "dense"] + runs


def _best(rows: list[dict], column: str) -> str:
    """`lowest ppl_wiki_128 47.27 (experiment: model at sparsity)`, or nothing when no row has the column."""
    row = min(rows, key=lambda r: _key(r, column), default=None)
    if row is None or _key(row, column)[0]:
        return ""
    word = "lowest" if column.startswith("ppl_") else "highest"
    return f"{word} {column} {_cell(row[column])} ({row['experiment']}: {row['model']} at {row['_sparsity']})"


def _label(settings: dict, groups: list[dict]) -> str:
    """How a group was measured: the token and example counts, and whatever else sets it apart from the others."""
    label = [f"{name} {_count(settings, key)}" for name, key in (("ppl tokens", "max_tokens"), ("zs limit", "limit"))]
    label += [
        f"{k} {settings.get(k)}"
        for k in sorted({k for g in groups for k in g} - {"max_tokens", "limit"})
        if any(g.get(k) != settings.get(k) for g in groups)
    ]
    return ", ".join(item for item in label if not item.endswith(" "))  # blank: the run predates the key


def best_runs(rows: list[dict]) -> list[str]:
    """One line per way of measuring (base model and `evaluate` settings but batch_size): the pruned or fine-tuned row
    with the lowest wiki perplexity at the shortest window, and the one with the highest zero-shot average. Numbers
    measured on other token counts, example counts, tasks or tokenizers are never compared."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["model"] != "dense":
            groups.setdefault(row["_measured"], []).append(row)
    settings = [json.loads(key) for key in groups]
    lines = []
    for key, same in groups.items():
        wiki = [m for m in _metrics(same) if m.startswith("ppl_wiki_")][:1]
        best = [b for b in (_best(same, c) for c in [*wiki, "acc_average"]) if b]
        if best:
            label = _label(json.loads(key), settings)
            lines.append(
                f"Best of {len(same)} pruned rows measured alike ({label or 'no settings'}): {'; '.join(best)}."
            )
    return lines


def render(rows: list[dict], sort: str | None = None, wide: bool = False) -> str:
    """The table, sorted when asked, and under it which pruned run was best."""
    rows = sort_rows(rows, sort) if sort else rows
    return markdown(rows, wide) + "".join(f"\n{line}\n" for line in best_runs(rows))


def report(sort: str | None = None, wide: bool = False) -> str:
    """Run `dvc exp show --json` here and render it."""
    shown = dvc("exp", "show", "--json")
    if shown.returncode != 0:
        raise ValueError(f"dvc exp show failed: {dvc_error(shown)}")
    return render(experiment_rows(json.loads(shown.stdout)), sort, wide)


README_BEGIN = "<!-- results: generated by `nirvana report --readme` from metrics/; tests check it -->"
README_END = "<!-- end of results -->"
NOT_COMMITTED = "not found; `nirvana report --readme` tabulates the run `make run` committed, from the repository root"


def committed(files: dict[str, dict], name: str) -> dict:
    """metrics/NAME.json of the committed run, or an InputError naming it (run elsewhere, or before `make run`)."""
    key = f"metrics/{name}.json"
    if key not in files:
        raise InputError(f"{key}: {NOT_COMMITTED}")
    return files[key]


def readme_table(root: str | Path = ".") -> str:
    """The committed run's quality table: dense, pruned and fine-tuned, from metrics/ and params.yaml."""
    root = Path(root)
    if not (root / "params.yaml").is_file():
        raise InputError(f"params.yaml: {NOT_COMMITTED}")
    found = [*root.glob("metrics/*.json"), *root.glob("timings/*.json")]
    files = with_timings({p.relative_to(root).as_posix(): json.loads(p.read_text()) for p in found})
    read = lambda name: committed(files, name)  # noqa: E731
    params, prune = yaml.safe_load((root / "params.yaml").read_text()), read("prune")
    steps = read("finetune").get("steps", 0)
    realised = f"{params['sparsity']} ({prune['sparsity_realised']:.4f})"
    method, _, gamma = plan_labels(params, read("plan"))
    method += f" (gamma {gamma})" if gamma else ""
    names = {"dense": ("dense", "0"), "pruned": (method, realised)}
    if steps:
        names["finetuned"] = (f"{method}{recovery_name(params)} ({steps} steps)", realised)
    ppl = [k for k in read("dense") if k.startswith("ppl_")]  # ppl_<set>_<window>: wiki first, then by window
    quality = [*sorted(ppl, key=lambda k: (k.split("_")[1] != "wiki", int(k.split("_")[2]))), "acc_average"]
    header = ["model", "sparsity (realised)", "params"]
    header += [f"{k.split('_')[1]} ppl @{k.split('_')[2]}" for k in quality[:-1]]
    header += [f"zero-shot avg ({params['evaluate']['limit'] or 'all'} per task)"]
    rows = []
    for key, (label, sparsity) in names.items():
        m = read(key)
        cells = [label, sparsity, f"{m['params_total'] / 1e6:.1f} M"]
        cells += [f"{m[k]:.2f}" if k.startswith("ppl") else f"{m[k]:.3f}" for k in quality]
        rows.append("| " + " | ".join(cells) + " |")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
    speed = read("efficiency")
    kinds = ("prefill_bs1", "prefill_bs8", "generate_bs1", "generate_bs8", "ideal")
    ratios = ", ".join(f"{k.replace('_', ' ')} x{speed[f'speedup_{k}']:.2f}" for k in kinds if f"speedup_{k}" in speed)
    lines += ["", f"Pruned against dense in the same run (compare stage, timed alternately): {ratios}."]
    if "metrics/gguf.json" in files:
        lines += ["", *llamacpp_table(files["metrics/gguf.json"])]
    return "\n".join([README_BEGIN, *lines, README_END]) + "\n"


def _ratio(by_model: dict, key: str) -> str:
    """`x1.08 ± 0.02`: a measured speedup with its spread (the standard error of its median), where it has one."""
    spread = by_model.get(f"{key}_spread")
    return f"x{by_model[key]:.2f}" + ("" if spread is None else f" ± {spread:.2f}")


def llamacpp_table(gguf: dict) -> list[str]:
    """The committed run in llama.cpp (measure_gguf): per GGUF type and model, size, wiki perplexity in llama.cpp
    and in transformers on the same tokens, and throughput; then the pruned model's speedups with their spreads
    against the ideal ratios."""
    if "unsupported" in gguf:
        return [f"No GGUF export for this model: {gguf['unsupported']}."]
    types = [t for t, v in gguf.items() if isinstance(v, dict) and "pruned_bytes_ratio" in v]
    transformers = gguf["transformers"]
    ppl = next(k for k in transformers["dense"] if k.startswith("ppl_"))
    measured = f"wiki ppl @{ppl.rsplit('_', 1)[1]}, {gguf['ppl_tokens']:,} tokens: llama.cpp"
    lines = [
        f"In llama.cpp ({gguf['threads']} threads; measure_gguf, dense, pruned and fine-tuned timed alternately):",
        "",
        f"| type | model | MiB | {measured} | transformers | prompt tok/s | generation tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for type in types:
        for name in ("dense", "pruned", "finetuned"):
            m = gguf[type][name]
            cells = [type, name, f"{m['mib']:.1f}", f"{m[ppl]:.2f}", f"{transformers[name][ppl]:.2f}"]
            cells += [f"{m['prompt_tokens_per_s']:.0f}", f"{m['gen_tokens_per_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Pruned against dense in llama.cpp (ideal FLOP ratio x{gguf['ideal_flop_ratio']:.2f}; a speedup is the median "
        "of its rounds' ratios, ± its standard error):",
        "",
    ]
    for type in types:
        t = gguf[type]
        rounds = f"{t['rounds']} round{'' if t['rounds'] == 1 else 's'}"
        lines.append(
            f"- {type} ({rounds}): bytes x{t['pruned_bytes_ratio']:.2f}, "
            f"prompt {_ratio(t, 'pruned_prompt_speedup')}, generation {_ratio(t, 'pruned_gen_speedup')}."
        )
    return lines
