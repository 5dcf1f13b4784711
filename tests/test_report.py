"""`nirvana report`: Markdown rows per experiment (pruned, and fine-tuned if trained) from `dvc exp show --json`."""

from pathlib import Path

import pytest

from nirvana.report import experiment_rows, markdown, readme_table
from nirvana.sweep import sweep_commands


def run(method: str, sparsity: float, ppl: float, digest: str, finetuned_digest: str, speed_digest: str) -> dict:
    """One commit's `data` as `dvc exp show --json` gives it; digests say which model a file measured."""
    quality = {"params_total": 800_000, "ppl_wiki_128": ppl, "acc_piqa": 0.55, "acc_average": 0.55}
    data = {
        "params": {
            "params.yaml": {
                "data": {
                    "method": method,
                    "sparsity": sparsity,
                    "allocation": {"mode": None},
                    "evaluate": {"limit": 100},
                }
            }
        },
        "metrics": {
            "metrics/dense.json": {
                "data": {"params_total": 1_000_000, "ppl_wiki_128": 20.0, "acc_piqa": 0.6, "acc_average": 0.6}
            },
            "metrics/prune.json": {"data": {"sparsity_realised": sparsity - 0.001}},
            "metrics/pruned.json": {"data": quality | {"model_digest": digest}},
            "metrics/finetuned.json": {"data": quality | {"ppl_wiki_128": ppl - 5}},
            "metrics/finetune.json": {"data": {"steps": 100, "base_digest": finetuned_digest}},
            "metrics/efficiency.json": {
                "data": {"speedup_prefill_bs1": 1.5, "speedup_ideal": 1.3, "pruned_digest": speed_digest}
            },
        },
    }
    return data


def test_rows_cover_dense_commits_experiments_and_fine_tuned_models() -> None:
    running = {"rev": "c" * 40, "name": "exp-2", "data": {"params": {}, "metrics": {}}}
    sweep = {"revs": [{"rev": "b" * 40, "name": "exp-1", "data": run("flap", 0.4, 90.0, "new", "old", "old")}, running]}
    main = {"rev": "a" * 40, "name": "main", "data": run("nirvana", 0.2, 30.0, "d", "d", "d"), "experiments": [sweep]}
    rows = experiment_rows([{"rev": "workspace", "data": {}}, main])
    assert [(r["experiment"], r["method"]) for r in rows] == [
        ("main", "dense"),
        ("main", "nirvana"),
        ("main", "nirvana + LoRA"),
        ("exp-1", "flap"),
    ]
    assert rows[0]["ppl_wiki_128"] == 20.0 and "speedup_ideal" not in rows[0]
    assert rows[1]["speedup_prefill_bs1"] == 1.5 and rows[2]["ppl_wiki_128"] == 25.0
    # the sweep stopped at evaluate@pruned: no stale speedups, no stale fine-tuned row
    assert rows[3]["allocation"] == "flap" and rows[3]["realised"] == 0.399 and "speedup_ideal" not in rows[3]
    table = markdown(rows).splitlines()
    header = "| experiment | method | allocation | sparsity | realised | zero-shot limit | params | ppl_wiki_128 |"
    assert table[0].startswith(header)
    assert table[2] == "| main | dense |  | 0 | 0 | 100 | 1.0 M | 20 | 0.6 | 0.6 |  |  |"
    assert table[5].startswith("| exp-1 | flap | flap | 0.4 | 0.399 | 100 | 0.8 M | 90 | 0.55 | 0.55 |  |")


def test_sweep_commands_cover_every_pair_and_refuse_bad_input_up_front() -> None:
    commands = sweep_commands(["flap", "random"], [0.1, 0.4], ["evaluate.limit=50"], queue=True)
    assert len(commands) == 4 and commands[0][2:] == [
        "dvc", "exp", "run", "--queue", "evaluate@dense", "evaluate@pruned",
        "-S", "method=flap", "-S", "sparsity=0.1", "-S", "evaluate.limit=50",
    ]  # fmt: skip
    assert commands[3][-5:] == ["method=random", "-S", "sparsity=0.4", "-S", "evaluate.limit=50"]
    for methods, sparsities, settings, match in (
        (["flapp"], [0.2], [], "unknown method.*flapp"),
        (["flap"], [1.0], [], "sparsity 1.0 is invalid"),
        (["flap"], [0.2], ["evaluate.limit"], "'evaluate.limit' is not KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=match):
            sweep_commands(methods, sparsities, settings, queue=False)


def test_the_dense_model_appears_once_per_distinct_evaluation() -> None:
    same, other = run("flap", 0.2, 40.0, "x", "", ""), run("taylor", 0.2, 45.0, "y", "", "")
    other["metrics"]["metrics/dense.json"]["data"]["acc_average"] = 0.58  # a sweep with another evaluate.limit
    experiments = [{"revs": [{"rev": "c" * 40, "name": n, "data": d}]} for n, d in (("a", same), ("b", other))]
    main = {
        "rev": "a" * 40,
        "name": "main",
        "data": run("nirvana", 0.2, 30.0, "d", "d", "d"),
        "experiments": experiments,
    }
    dense = [r for r in experiment_rows([main]) if r["method"] == "dense"]
    assert [(r["experiment"], r["acc_average"]) for r in dense] == [("main", 0.6), ("b", 0.58)]


def test_readme_results_are_the_committed_metrics() -> None:
    """The README's results table is the committed run's: regenerate it with `nirvana report --readme`."""
    root = Path(__file__).resolve().parents[1]
    assert readme_table(root) in (root / "README.md").read_text(), "run `nirvana report --readme`, paste into README"
