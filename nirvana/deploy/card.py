"""Model cards (README.md, Hugging Face format) for the folders the prune, finetune and publish stages write.

The card's metadata (built with huggingface_hub's ModelCardData) holds the provenance a reader needs to
trust a pruned model: the base model and its folder digest, the pruning settings, the calibration
selection, per-layer widths, parameter counts, the fine-tuning summary, a content hash of the code the
stage ran and dvc.lock's digest, the environment it computed in (package versions, CPU kernels and threads,
GPU; nirvana.core.environment), and the SHA-256 of every stored tensor and safetensors file, which
`nirvana verify` recomputes. Nothing in it depends on the commit or the clock, so the same code, params
and inputs give the same card, byte for byte. The published folder's card adds the measured results as
`model-index` evaluation results, the fields the Hub renders. The Markdown below the metadata is for people.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open
from transformers import PreTrainedModel

from nirvana.core.environment import describe, reproducible
from nirvana.core.io import folder_digest, sha256_file
from nirvana.core.params import FinetuneParams, Params
from nirvana.method.allocation import allocation_mode, llm_pruner_band
from nirvana.method.surgery import layer_units
from nirvana.models.loading import hub_id

CARD = "README.md"
CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout the running code comes from
LOCK_NOTE = (
    "SHA-256 over dvc.lock's entries of the stages upstream of this one, which DVC wrote during this "
    "run before this stage started: the exact inputs, params and outputs that fed it"
)
UPSTREAM = {  # the stages whose dvc.lock entries pin what a stage's model was made from
    "prune": ("prepare_model", "prepare_data", "select_calibration", "compute_saliency", "allocate_sparsity"),
    "finetune": (
        "prepare_model",
        "prepare_data",
        "select_calibration",
        "compute_saliency",
        "allocate_sparsity",
        "prune",
    ),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOSS_NAMES = {"lm": "next-token loss", "kd": "distilled from the teacher", "mix": "next-token loss + distillation"}


def recovery_label(adapter: str | None, loss: str | None) -> str:
    """How a model was recovered, in words: 'LoRA, merged; next-token loss' (older runs: LoRA and lm)."""
    trained = "every weight" if adapter == "full" else "LoRA, merged"
    return f"{trained}; {LOSS_NAMES[loss or 'lm']}"


# --- hashes of what the folder stores -------------------------------------------------------------


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def file_tensors(path: Path, name: str) -> dict[str, dict[str, Any]]:
    """dtype, shape and SHA-256 of each tensor in one safetensors file, read with safetensors' safe_open."""
    out: dict[str, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            piece = f.get_slice(key)
            sha = tensor_sha256(f.get_tensor(key))
            out[key] = dict(file=name, dtype=piece.get_dtype(), shape=list(piece.get_shape()), sha256=sha)
    return out


def weight_hashes(folder: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """SHA-256 of every safetensors file and every tensor in `folder`, and of the Python files (the
    modeling file `trust_remote_code` runs); and the files that safetensors could not read (name ->
    error), so that `verify` reports a corrupt header instead of crashing."""
    folder = Path(folder)
    files, tensors, unreadable = {}, {}, {}
    for path in sorted(folder.rglob("*.py")):
        files[path.relative_to(folder).as_posix()] = sha256_file(path)
    for path in sorted(folder.rglob("*.safetensors")):
        name = path.relative_to(folder).as_posix()
        files[name] = sha256_file(path)
        try:
            tensors.update(file_tensors(path, name))
        except Exception as err:  # a truncated or corrupt file: safetensors raises its own error types
            unreadable[name] = f"{type(err).__name__}: {err}"
    return {"files": files, "tensors": tensors}, unreadable


# --- where the code and the pipeline state stood -------------------------------------------------


def _code_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts) if path.is_dir() else [path]


def code_state(stage: str, root: Path = CODE_ROOT) -> dict[str, Any]:
    """SHA-256 of the code `stage` ran: the nirvana/ and stages/ files dvc.yaml lists as its deps (a test
    keeps them equal to what the stage imports). The same code hashes the same at any commit."""
    dvc_yaml = root / "dvc.yaml"
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.is_file() else {}
    if stage not in stages:
        return {"sha256": None, "note": f"no stage {stage} in {dvc_yaml} (code not run from a checkout)"}
    deps = [d for d in stages[stage].get("deps", []) if d.startswith(("nirvana", "stages"))]
    files = {p.relative_to(root).as_posix(): sha256_file(p) for d in deps for p in _code_files(root / d)}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": dict(sorted(files.items()))}


def lock_state(path: str | Path = "dvc.lock", stage: str = "prune") -> dict[str, Any]:
    """SHA-256 of the dvc.lock entries of `stage`'s upstream stages (canonical JSON), or why there is
    none. Only upstream entries: they are final when the stage runs, so the hash is reproducible."""
    path = Path(path)
    digest, upstream = lock_hash(path.read_text() if path.is_file() else "", UPSTREAM.get(stage, ()))
    if digest is None:
        return {"sha256": None, "note": f"no dvc.lock entries upstream of {stage} (not run by DVC)"}
    return {"sha256": digest, "stages": upstream, "note": LOCK_NOTE}


def lock_hash(lock_text: str, stages: tuple[str, ...] | list[str]) -> tuple[str | None, list[str]]:
    """SHA-256 of a dvc.lock's entries of `stages` (canonical JSON), and which of them it has."""
    entries = (yaml.safe_load(lock_text) or {}).get("stages", {}) if lock_text else {}
    upstream = {name: entries[name] for name in stages if name in entries}
    if not upstream:
        return None, []
    text = json.dumps(upstream, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), sorted(upstream)


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


def chosen(params: Params, choices: pd.DataFrame) -> Params:
    """`params` with the criterion and gamma of the plan allocate_sparsity chose (`choices`, its table)."""
    row = choices[choices["selected"]].iloc[0]
    gamma = params.gamma if pd.isna(row["gamma"]) else float(row["gamma"])
    return dataclasses.replace(params, method=str(row["method"]), gamma=gamma)


def selection_record(params: Params, choices: pd.DataFrame) -> dict[str, Any] | None:
    """The plan selection (nirvana.method.selection): what was searched (`method`, `gamma`) and every choice's
    held-out KL; None when there was one plan and nothing to choose."""
    if len(choices) == 1:
        return None
    columns = ["method", "allocation", "gamma", "kl", "sparsity_realised", "selected"]
    rows = choices[columns].astype(object).where(choices[columns].notna(), None)
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
    (`nirvana.method.selection.winner`), `metrics` are the prune stage's (counts, sparsity)."""
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


# --- verification --------------------------------------------------------------------------------


def _tensor_difference(card: dict[str, Any], found: dict[str, Any]) -> str:
    fields = [k for k in ("sha256", "dtype", "shape", "file") if card.get(k) != found.get(k)]
    shown = [f"{k} {card.get(k)} in the card, {found.get(k)} in the folder" for k in fields if k != "sha256"]
    return ", ".join((["SHA-256 differs"] if "sha256" in fields else []) + shown)


def compare_weights(card: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """One line per file or tensor that is missing, extra or different."""
    problems = []
    for kind in ("files", "tensors"):
        recorded, present = card.get(kind) or {}, found[kind]
        for name in sorted(recorded.keys() | present.keys()):
            where = f"{kind[:-1]} {name}"
            if name not in present:
                problems.append(f"{where}: missing (in the card, not in the folder)")
            elif name not in recorded:
                problems.append(f"{where}: extra (in the folder, not in the card)")
            elif recorded[name] != present[name]:
                diff = "SHA-256 differs" if kind == "files" else _tensor_difference(recorded[name], present[name])
                problems.append(f"{where}: {diff}")
    return problems


def lock_commits(lock: dict[str, Any], repo: str | Path = ".") -> list[str] | None:
    """The commits of `repo` whose committed dvc.lock has the entries a card's `dvc_lock` hash covers, oldest
    first: the commit of the run that made the model (later ones kept those entries). None outside git."""
    if not lock.get("sha256"):
        return []
    git = ["git", "-C", str(repo)]
    history = subprocess.run([*git, "log", "--format=%H", "--", ":/dvc.lock"], capture_output=True, text=True)
    if history.returncode != 0:
        return None
    found = []
    for commit in reversed(history.stdout.split()):
        text = subprocess.run([*git, "show", f"{commit}:dvc.lock"], capture_output=True, text=True).stdout
        if lock_hash(text, lock.get("stages", []))[0] == lock["sha256"]:
            found.append(commit)
    return found


def provenance_line(card: dict[str, Any], repo: str | Path = ".") -> str:
    """Where the card's dvc.lock hash leads in this repository's history, in one line."""
    commits = lock_commits(card.get("dvc_lock") or {}, repo)
    if commits is None:
        return "not in a git repository: clone the project to find the commit that made it"
    if not commits:
        return "no commit here has the dvc.lock entries its card names (an uncommitted run, or another repository)"
    later = f" (and {len(commits) - 1} later commit(s) that kept them)" if len(commits) > 1 else ""
    return f"made by the run committed in {commits[0][:12]}{later}: `git checkout {commits[0][:12]}` to reproduce it"


def verify_folder(folder: str | Path) -> tuple[bool, str]:
    """Recompute the weight hashes of `folder` and check them against its card: (ok, message)."""
    folder = Path(folder)
    try:
        card = (read_card(folder).get("nirvana") or {}).get("weights")
    except (OSError, ValueError, yaml.YAMLError) as err:
        return False, f"{folder}: no readable model card: {err}"
    if not isinstance(card, dict):
        return False, f"{folder / CARD}: no nirvana.weights section to check against"
    found, unreadable = weight_hashes(folder)
    problems = [f"file {name}: unreadable by safetensors ({err})" for name, err in unreadable.items()]
    problems += compare_weights(card, found)
    if problems:
        return False, f"{folder}: {len(problems)} problem(s) against {folder / CARD}:\n  " + "\n  ".join(problems)
    weights = [name for name in found["files"] if name.endswith(".safetensors")]
    others = len(found["files"]) - len(weights)
    also = f" and {others} Python file(s)" if others else ""
    return True, f"{folder}: OK, {len(found['tensors'])} tensors in {len(weights)} safetensors file(s){also} match"
