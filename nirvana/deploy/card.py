"""Model cards (README.md, Hugging Face format) for the folders the prune, finetune and publish stages write: the
provenance records the stages build, and the card they render from them with its hashes (nirvana.deploy.hashes).

The metadata (huggingface_hub's ModelCardData) holds what a reader needs to trust a pruned model: the base model
and its folder digest, the pruning settings, the calibration and plan selection, per-layer widths, parameter
counts, the fine-tuning summary, the hashes of the code and dvc.lock, the environment it computed in
(nirvana.core.environment), and the SHA-256 of every stored tensor and file, which `nirvana verify`
(nirvana.deploy.verify) recomputes. Nothing in it depends on the commit or the clock, so the same code, params and
inputs give the same card, byte for byte. The published folder's card adds the measured results as `model-index`
evaluation results. The Markdown below the metadata is for people.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from nirvana.core.environment import describe, reproducible
from nirvana.core.io import folder_digest
from nirvana.core.params import FinetuneParams, Params
from nirvana.deploy.hashes import code_state, lock_state, weight_hashes
from nirvana.method.allocation import allocation_mode, llm_pruner_band
from nirvana.method.surgery import layer_units
from nirvana.models.loading import hub_id

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOSS_NAMES = {"lm": "next-token loss", "kd": "distilled from the teacher", "mix": "next-token loss + distillation"}


def recovery_label(adapter: str | None, loss: str | None) -> str:
    """How a model was recovered, in words: 'LoRA, merged; next-token loss' (older runs: LoRA and lm)."""
    trained = "every weight" if adapter == "full" else "LoRA, merged"
    return f"{trained}; {LOSS_NAMES[loss or 'lm']}"


# --- what the stages know ------------------------------------------------------------------------


def calibration_record(metrics: str | Path, candidates: str | Path) -> dict[str, Any] | None:
    """select_calibration's summary (KL of the winner, median, worst), the winner's candidate, seed
    and window count, and what it was drawn from (file and SHA-256, or dataset id), from its outputs;
    None when the stage has not run (a pruned folder made outside DVC)."""
    metrics, candidates = Path(metrics), Path(candidates)
    if not metrics.is_file():
        return None
    record: dict[str, Any] = json.loads(metrics.read_text())
    if candidates.is_file():
        table = pd.read_parquet(candidates)
        winner = table[table["selected"]].iloc[0]
        record |= {
            "selected_candidate": int(winner["candidate"]),
            "seed": int(winner["seed"]),
            **({"windows": len(winner["windows"])} if "windows" in table else {}),
        }
        record |= {key: str(winner[key]) for key in ("pool", "pool_sha256") if key in table}
    return record


def selected_params(params: Params, plans: pd.DataFrame) -> Params:
    """`params` with the criterion and gamma of the plan allocate_sparsity selected (`plans`, its table of plans)."""
    row = plans[plans["selected"]].iloc[0]
    gamma = params.gamma if pd.isna(row["gamma"]) else float(row["gamma"])
    return dataclasses.replace(params, method=str(row["method"]), gamma=gamma)


def selection_record(params: Params, plans: pd.DataFrame) -> dict[str, Any] | None:
    """The plan selection (nirvana.method.selection): what was searched (`method`, `gamma`) and every plan's
    held-out KL (as `choices`); None when there was one plan and nothing to choose."""
    if len(plans) == 1:
        return None
    columns = ["method", "allocation", "gamma", "kl", "sparsity_realised", "selected"]
    rows = plans[columns].astype(object).where(plans[columns].notna(), None)
    return {"method": params.method, "gamma": params.gamma, "choices": rows.to_dict(orient="records")}


def allocation_label(params: Params, layers: int) -> str:
    """The allocation a model was pruned with; LLM-Pruner's with the band of layers it pruned."""
    mode = allocation_mode(params)
    if mode != "llm_pruner":
        return mode
    start, end = llm_pruner_band(layers, params.allocation.band)
    return f"llm_pruner (layers {start}-{end - 1})"


def prune_record(
    params: Params,
    base_dir: str | Path,
    model: PreTrainedModel,
    metrics: dict,
    calibration: dict | None,
    selection: dict | None = None,
) -> dict[str, Any]:
    """The provenance of a freshly pruned model; `params` name the chosen criterion and gamma
    (`nirvana.deploy.card.selected_params`), `metrics` are the prune stage's (counts, sparsity)."""
    return {
        "stage": "prune",
        "base_model": {
            "name_or_path": params.model.name_or_path,
            "hub_id": hub_id(params.model.name_or_path),
            "digest": folder_digest(base_dir),
        },
        "architecture": model.config.model_type,
        "encoder_decoder": bool(getattr(model.config, "is_encoder_decoder", False)),
        "method": params.method,
        "sparsity": {"requested": params.sparsity, "realised": metrics["sparsity_realised"]},
        "gamma": params.gamma,
        "allocation_mode": allocation_label(params, len(layer_units(model))),
        "attention_granularity": params.attention.granularity,
        "calibration": calibration,
        "plan_selection": selection,
        "params": {"dense": metrics["dense"], "pruned": metrics["pruned"]},
        "layers": layer_units(model),
        "finetune": None,
    }


def finetune_record(
    pruned_dir: str | Path, f: FinetuneParams, summary: dict, model: PreTrainedModel | None
) -> dict[str, Any]:
    """The pruned model's provenance (from its card) plus the fine-tuning; widths come from the tuned
    model, or from the pruned card when `model` is None (steps 0: the weights are a copy)."""
    pruned = read_card(pruned_dir).get("nirvana") if (Path(pruned_dir) / CARD).is_file() else None
    carried = {
        k: v for k, v in (pruned or {}).items() if k not in ("stage", "code", "dvc_lock", "environment", "weights")
    }
    source = {"digest": folder_digest(pruned_dir), "card": CARD if pruned else None}
    if pruned:
        source |= {key: pruned.get(key) for key in ("code", "dvc_lock", "environment")}
    layers = layer_units(model) if model is not None else carried.get("layers")
    tuned = summary | {"params": dataclasses.asdict(f)}
    return {"stage": "finetune", **carried, "pruned_model": source, "layers": layers, "finetune": tuned}


# --- the card ------------------------------------------------------------------------------------


def card_data(record: dict[str, Any], evaluations: list | None = None) -> ModelCardData:
    """Hugging Face metadata; `base_model` only for a Hub id, which is what the Hub accepts there."""
    base = record.get("base_model") or {}
    name = base.get("hub_id") or base.get("name_or_path") or ""
    tags = ["nirvana", "pruned", "structured-pruning"]
    if "method" in record:
        tags.append(f"method-{record['method']}")
    tuned = record.get("finetune") or {}
    if tuned.get("steps", 0) > 0:
        tags += ["full-fine-tune" if tuned.get("adapter") == "full" else "lora", "fine-tuned"]
        tags += ["distillation"] if tuned.get("loss") in ("kd", "mix") else []
    return ModelCardData(
        base_model=name if HUB_ID.match(name) and not Path(name).exists() else None,
        library_name="transformers",
        pipeline_tag="text2text-generation" if record.get("encoder_decoder") else "text-generation",
        tags=tags,
        model_name=f"{name or 'model'} pruned with nirvana" if evaluations else None,
        eval_results=evaluations or None,
        nirvana=record,
    )


def model_card(record: dict[str, Any], folder: str | Path, cwd: str | Path = ".", evaluation: str = "") -> str:
    """The README.md text for `folder` as written: `record` plus code, dvc.lock and weight hashes.
    `cwd` is the repository the stage runs in (DVC runs stages at its root)."""
    weights, unreadable = weight_hashes(folder)
    if unreadable:
        raise ValueError(f"cannot read {', '.join(unreadable)} in {folder} with safetensors")
    lock = lock_state(Path(cwd) / "dvc.lock", record["stage"])
    code, environment = code_state(record["stage"]), reproducible()
    full = record | {"code": code, "dvc_lock": lock, "environment": environment, "weights": weights}
    return card_text(card_data(full), body(full, evaluation))


def card_text(data: ModelCardData, markdown: str) -> str:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{markdown}").content


def read_card(folder: str | Path) -> dict[str, Any]:
    """The metadata of a folder's README.md (raises ValueError if it has none)."""
    path = Path(folder) / CARD
    text = path.read_text()
    if not re.match(r"---\n(.*?\n)---\n", text, re.DOTALL):
        raise ValueError(f"{path} has no YAML front matter")
    try:
        meta = ModelCard(text).data.to_dict()
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: unreadable metadata: {err}") from err
    if not meta:
        raise ValueError(f"{path}: the front matter is not a mapping")
    return meta


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _provenance(r: dict[str, Any]) -> str:
    base, code, lock = r.get("base_model") or {}, r["code"], r["dvc_lock"]
    files = f"SHA-256 `{code['sha256']}` over {len(code.get('files', {}))} files (listed in the metadata)"
    rows = [
        ("stage", f"`{r['stage']}`"),
        ("base model", f"`{base.get('name_or_path')}`, folder digest `{base.get('digest')}`" if base else "unknown"),
        ("code", files if code["sha256"] else code["note"]),
        ("dvc.lock", f"SHA-256 `{lock['sha256']}`: {lock['note']}" if lock["sha256"] else lock["note"]),
    ]
    if "pruned_model" in r:
        rows.append(("pruned model", f"folder digest `{r['pruned_model']['digest']}`"))
    if r.get("environment"):
        env = r["environment"]
        packages = ", ".join(f"{name} {v}" for name, v in env["packages"].items() if v)
        rows += [("computed on", describe(env)), ("software", f"Python {env['python']}; {packages}")]
    return "## Provenance\n\n" + _table(rows, ("", ""))


def _pruning(r: dict[str, Any]) -> str:
    if "method" not in r:
        return "## Pruning\n\nUnknown: the pruned model this was fine-tuned from had no model card."
    s, cal, counts = r["sparsity"], r.get("calibration"), r.get("params") or {}
    rows = [
        ("method", r["method"]),
        ("sparsity (attention+MLP), requested / realised", f"{s['requested']} / {s['realised']}"),
        ("gamma (MLP / attention pruning fraction)", r["gamma"] if r.get("allocation_mode") == "nirvana" else "n/a"),
        ("allocation mode", r["allocation_mode"]),
        ("attention granularity", r["attention_granularity"]),
    ]
    rows += [
        (f"parameters {k}, dense / pruned", f"{v:,} / {counts['pruned'][k]:,}") for k, v in counts["dense"].items()
    ]
    text = "## Pruning\n\n" + _table(rows, ("", "")) + _selection(r.get("plan_selection"))
    if cal is None:
        return text + "\n\nCalibration selection: not recorded (no metrics/calibration.json when pruning)."
    return text + "\n\n### Calibration selection (KL to the dense model)\n\n" + _table(list(cal.items()), ("", ""))


def _choice(c: dict[str, Any]) -> tuple[Any, ...]:
    mark = "chosen" if c["selected"] else ""
    return c["method"], c["allocation"], _figure(c["gamma"], None), _figure(c["kl"]), c["sparsity_realised"], mark


def _selection(s: dict[str, Any] | None) -> str:
    if not s:
        return ""
    header = ("method", "allocation", "gamma", "KL", "sparsity realised", "")
    searched = f"`method: {s['method']}`, `gamma: {s['gamma']}`"
    title = "\n\n### Plan selection (KL to the dense model on the held-out set)\n\n"
    return f"{title}Searched {searched}:\n\n" + _table([_choice(c) for c in s["choices"]], header)


def _finetune(r: dict[str, Any]) -> str:
    tuned = r.get("finetune")
    if tuned is None:
        return ""
    if tuned.get("steps", 0) == 0:
        return "## Fine-tuning\n\nSkipped (`finetune.steps: 0`): the weights are those of the pruned model.\n\n"
    rows = [(k, v) for k, v in tuned.items() if k != "params"] + [("params", json.dumps(tuned["params"]))]
    title = recovery_label(tuned.get("adapter"), tuned.get("loss"))
    return f"## Fine-tuning ({title})\n\n" + _table(rows, ("", "")) + "\n\n"


def _layers(layers: list[dict[str, int]] | None) -> str:
    if not layers:
        return "## Per-layer widths\n\nNot recorded."
    modules = list(dict.fromkeys(m for layer in layers for m in layer))
    rows = [(i, *(layer.get(m, "") for m in modules)) for i, layer in enumerate(layers)]
    return "## Per-layer widths (kept units)\n\n" + _table(rows, ("layer", *modules))


# A card is written with its folder, before `evaluate` measures the model; the published folder has the numbers.
NOT_YET_MEASURED = (
    "## Results\n\nNot in this card: the `evaluate` stage measures this folder after it is written. The "
    "folder to ship, `outputs/release/` (stage `publish`), is this model with a card that has its perplexity "
    "and zero-shot accuracy; `metrics/` holds them too.\n\n"
)


def _figure(value: Any, digits: int | None = 5) -> str:
    """A number for a table cell, `n/a` where there is none (a plan without a search has no KL, and
    an allocation without two pools no gamma)."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) and digits is not None else str(value)


def body(r: dict[str, Any], evaluation: str = "") -> str:
    """The human-readable part: the same facts as the front matter, in tables."""
    name = (r.get("base_model") or {}).get("name_or_path", "a model")
    weights = r["weights"]
    files = [
        (f"`{n}`", f"`{sha}`", sum(t["file"] == n for t in weights["tensors"].values()))
        for n, sha in weights["files"].items()
    ]
    evaluation = evaluation or NOT_YET_MEASURED
    return (
        f"# `{name}`, structurally pruned with NIRVANA\n\n"
        "Written by the nirvana pipeline. Load it with `import nirvana; nirvana.register()` first (that "
        "registers the pruned widths recorded in `config.json` with transformers), then "
        "`AutoModelForCausalLM.from_pretrained(folder)`; or, "
        "without nirvana, `from_pretrained(folder, trust_remote_code=True)`, which runs the folder's "
        "`modeling_nirvana.py` (its SHA-256 is below). `nirvana verify FOLDER` checks the weights against "
        "this card and names the commit whose `dvc.lock` made them.\n\n"
        f"{evaluation}{_provenance(r)}\n\n{_pruning(r)}\n\n{_finetune(r)}{_layers(r.get('layers'))}\n\n"
        "## Weights\n\n"
        f"SHA-256 of each of the {len(weights['tensors'])} tensors (its stored bytes, with dtype and shape) "
        "is in the front matter under `nirvana.weights.tensors`; `nirvana verify FOLDER` recomputes them "
        "and the file hashes.\n\n" + _table(files, ("file", "SHA-256", "tensors")) + "\n"
    )


# --- the published folder: the card with measured results ----------------------------------------

DATASETS = {  # our evaluation sets and tasks -> (Hub dataset id, name): the sources of the offline copies
    "wiki": ("google/boolq", "BoolQ validation passages (wiki)"),
    "books": ("EleutherAI/lambada_openai", "LAMBADA passages (books)"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "boolq": ("google/boolq", "BoolQ"),
    "hellaswag": ("Rowan/hellaswag", "HellaSwag"),
    "openbookqa": ("allenai/openbookqa", "OpenBookQA"),
    "piqa": ("ybisk/piqa", "PIQA"),
    "winogrande": ("allenai/winogrande", "WinoGrande"),
}


def evaluations(metrics: dict[str, Any], zero_shot: dict[str, Any]) -> list[EvalResult]:
    """The evaluate stage's perplexities and zero-shot accuracies as Hub evaluation results."""
    results = []
    for key, value in sorted(metrics.items()):
        match = re.fullmatch(r"ppl_(\w+)_(\d+)", key)
        if match and match[1] in DATASETS:
            hub, name = DATASETS[match[1]]
            config = f"non-overlapping {match[2]}-token windows"
            results.append(_result("text-generation", hub, name, "perplexity", value, config))
    limit = zero_shot.get("limit")
    for task, info in sorted(zero_shot.get("tasks", {}).items()):
        hub, name = DATASETS.get(task, (task, task))
        config = f"lm-eval {zero_shot.get('lm_eval_version')}, 0-shot, first {limit or 'all'} examples"
        result = _result("multiple-choice", hub, name, info["metric"], metrics[f"acc_{task}"], config)
        results.append(dataclasses.replace(result, dataset_split=info.get("split")))
    return results


def _result(task: str, hub: str, name: str, metric: str, value: float, config: str) -> EvalResult:
    return EvalResult(
        task_type=task,
        dataset_type=hub,
        dataset_name=name,
        metric_type=metric,
        metric_value=value,
        metric_config=config,
    )


def release_card(folder: str | Path, results: dict[str, dict[str, Any]], zero_shot: dict[str, Any]) -> str:
    """The card of the folder a user would publish: the fine-tuned model's card plus its measured results
    (`results` has the evaluate metrics of dense, pruned and finetuned) in metadata and in a table."""
    meta = read_card(folder)
    record = meta["nirvana"] | {"stage": "publish"}
    keys = sorted(k for k in results["finetuned"] if k.startswith(("ppl_", "acc_")))
    rows = [(k, *(results[m].get(k, "") for m in ("dense", "pruned", "finetuned"))) for k in keys]
    table = "## Results (evaluate stage)\n\n" + _table(rows, ("metric", "dense", "pruned", "this model")) + "\n\n"
    data = card_data(record, evaluations(results["finetuned"], zero_shot))
    return card_text(data, body(record, table))
