"""`nirvana report`: Markdown rows per experiment (pruned, and fine-tuned if trained) from `dvc exp show --json`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nirvana.pipeline import cli, report
from nirvana.pipeline.report import best_runs, experiment_rows, llamacpp_table, markdown, readme_table, sort_rows
from nirvana.pipeline.sweep import sweep_commands

ROOT = Path(__file__).resolve().parents[1]


def run(
    method: str, sparsity: float, ppl: float, digest: str, finetuned_digest: str, speed_digest: str, **params: dict
) -> dict:
    """One commit's `data` as `dvc exp show --json` gives it; digests say which model a file measured, `params`
    replaces whole sections of params.yaml (calibration, finetune, evaluate, model)."""
    quality = {"params_total": 800_000, "ppl_wiki_128": ppl, "acc_piqa": 0.55, "acc_average": 0.55}
    data = {
        "params": {
            "params.yaml": {
                "data": {
                    "method": method,
                    "sparsity": sparsity,
                    "gamma": 3.0,
                    "allocation": {"mode": None},
                    "evaluate": {"limit": 100},
                }
                | params
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
    assert [(r["experiment"], r["model"]) for r in rows] == [
        ("main", "dense"),
        ("main", "nirvana"),
        ("main", "nirvana + LoRA"),
        ("exp-1", "flap"),
    ]
    assert rows[0]["ppl_wiki_128"] == 20.0 and "speedup_ideal" not in rows[0]
    assert rows[1]["speedup_prefill_bs1"] == 1.5 and rows[2]["ppl_wiki_128"] == 25.0
    # the sweep stopped at evaluate@pruned: no stale speedups, no stale fine-tuned row
    assert rows[3]["alloc"] == "flap" and rows[3]["sparsity"] == "0.4 (0.3990)" and "speedup_ideal" not in rows[3]
    table = markdown(rows).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "experiment", "model", "sparsity", "calibration", "finetune data", "ppl tokens", "zs limit",
        "ppl_wiki_128", "acc_average",
    ]  # fmt: skip
    assert table[1].startswith("|------------|----------------|") and table[1].endswith(
        "|-------------:|------------:|"
    )
    assert table[
        2
    ] == "| main       | dense          | 0            |             |               |            | 100      |" + (
        "           20 |         0.6 |"
    )
    assert len({len(line) for line in table}) == 1  # padded into aligned columns
    wide = markdown(rows, wide=True).splitlines()
    assert "| alloc   |" in wide[0] and "| params |" in wide[0] and wide[0].endswith("| speedup_prefill_bs1 |")
    assert wide[3].startswith("| main       | nirvana        | nirvana | 3.0   | 0.2 (0.1990) | built-in    |")
    assert wide[5].startswith("| exp-1      | flap           | flap    |       | 0.4 (0.3990) |")  # no gamma in FLAP's


def test_a_run_stopped_before_evaluate_gets_no_numbers_of_another_run() -> None:
    """An experiment run only up to `prune` keeps the committed run's metrics/pruned.json (another model): its row
    says "not evaluated" and shows neither those numbers nor the committed run's speedups, nor wins the summary."""
    main = {"rev": "a" * 40, "name": "main", "data": run("nirvana", 0.2, 30.0, "d", "d", "d")}
    main["data"]["metrics"]["metrics/prune.json"]["data"]["model_digest"] = "d"
    stopped = run("flap", 0.3, 10.0, "d", "d", "d")  # its pruned.json, finetune.json and speeds are main's ("d")
    stopped["metrics"]["metrics/prune.json"]["data"]["model_digest"] = "new"
    main["experiments"] = [{"revs": [{"rev": "b" * 40, "name": "exp-1", "data": stopped}]}]
    rows = experiment_rows([main])
    assert [(r["experiment"], r["model"]) for r in rows] == [
        ("main", "dense"),
        ("main", "nirvana"),
        ("main", "nirvana + LoRA"),
        ("exp-1", "flap (not evaluated)"),
    ]
    assert not [k for k in rows[3] if k.startswith(("ppl_", "acc_", "speedup_"))] and rows[3]["params"] == ""
    assert rows[1]["ppl_wiki_128"] == 30.0 and rows[1]["speedup_prefill_bs1"] == 1.5
    assert "lowest ppl_wiki_128 25 (main: nirvana + LoRA at 0.2)" in best_runs(rows)[0]


def test_a_searched_criterion_and_gamma_show_what_won() -> None:
    data = run("nirvana", 0.3, 40.0, "d", "d", "d", gamma="auto")
    data["metrics"]["metrics/plan.json"] = {"data": {"method": "nirvana", "gamma": 6.0, "kl_selected": 0.9}}
    both = run("nirvana", 0.3, 40.0, "e", "e", "e", gamma="auto")
    both["params"]["params.yaml"]["data"]["method"] = ["nirvana", "taylor"]
    both["metrics"]["metrics/plan.json"] = {"data": {"method": "taylor", "gamma": None}}
    exps = {"revs": [{"rev": "b" * 40, "name": "exp-2", "data": both}]}
    rows = experiment_rows([{"rev": "a" * 40, "name": "main", "data": data, "experiments": [exps]}])
    pruned = [(r["model"], r["alloc"], r["gamma"]) for r in rows if r["model"] != "dense"]
    assert pruned == [
        ("nirvana", "nirvana", "auto -> 6.0"),
        ("nirvana + LoRA", "nirvana", "auto -> 6.0"),
        ("nirvana|taylor -> taylor", "llm_pruner", ""),  # taylor's own allocation has no gamma
        ("nirvana|taylor -> taylor + LoRA", "llm_pruner", ""),
    ]


def test_sweep_commands_cover_every_pair_and_refuse_bad_input_up_front() -> None:
    commands = sweep_commands(["flap", "random"], [0.1, 0.4], ["evaluate.limit=50"], queue=True)
    assert len(commands) == 4 and commands[0][2:] == [
        # compare: its plots/models.csv, each experiment's own bars; measure_gguf: its llama.cpp speedups
        "dvc", "exp", "run", "--queue", "compare", "measure_gguf",
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
    dense = [r for r in experiment_rows([main]) if r["model"] == "dense"]
    assert [(r["experiment"], r["acc_average"]) for r in dense] == [("main", 0.6), ("b", 0.58)]


def test_readme_results_are_the_committed_metrics() -> None:
    """The README's results table is the committed run's: regenerate it with `nirvana report --readme`."""
    root = Path(__file__).resolve().parents[1]
    assert readme_table(root) in (root / "README.md").read_text(), "run `nirvana report --readme`, paste into README"


def test_calibration_finetune_data_and_ppl_tokens_read_old_and_new_params() -> None:
    """Old runs: calibration.path null and finetune.dataset (null, a file or an id); new runs: path defaults to the
    built-in pool and source holds a Hugging Face id. evaluate.max_tokens null means the whole sets."""
    old_file = run(
        "nirvana", 0.2, 40.0, "a", "a", "",
        calibration={"path": "data/calibration/mine.parquet", "source": None},
        finetune={"dataset": "yahma/alpaca-cleaned"},
        evaluate={"limit": 50, "max_tokens": None},
    )  # fmt: skip
    old_hub = run(
        "nirvana", 0.2, 41.0, "b", "b", "",
        calibration={"path": None, "source": "allenai/c4"},
        finetune={"dataset": "data/finetune/chat.jsonl"},
        evaluate={"limit": 50, "max_tokens": 2048},
    )  # fmt: skip
    new = run(
        "taylor", 0.3, 42.0, "c", "c", "",
        calibration={"path": "outputs/corpora/calibration.parquet", "source": None},
        finetune={"path": "data/finetune/alpaca.parquet", "source": None},
        evaluate={"limit": None, "max_tokens": 16384},
    )  # fmt: skip
    new_hub = run(
        "taylor", 0.3, 43.0, "d", "d", "",
        calibration={"path": "outputs/corpora/calibration.parquet", "source": "wikitext"},
        finetune={"path": "outputs/corpora/calibration.parquet", "source": "yahma/alpaca-cleaned"},
        evaluate={"limit": 50, "max_tokens": 16384},
    )  # fmt: skip
    commits = [
        {"rev": c * 40, "name": n, "data": d}
        for c, n, d in zip("abcd", "wxyz", (old_file, old_hub, new, new_hub), strict=True)
    ]
    rows = experiment_rows(commits)
    seen = [
        (r["experiment"], r["model"], r["calibration"], r["finetune data"], r["ppl tokens"], r["zs limit"])
        for r in rows
    ]
    assert seen[-8:] == [
        ("w", "nirvana", "mine.parquet", "", "all", 50),
        ("w", "nirvana + LoRA", "mine.parquet", "yahma/alpaca-cleaned", "all", 50),
        ("x", "nirvana", "allenai/c4", "", 2048, 50),
        ("x", "nirvana + LoRA", "allenai/c4", "chat.jsonl", 2048, 50),
        ("y", "taylor", "built-in", "", 16384, "all"),
        ("y", "taylor + LoRA", "built-in", "alpaca.parquet", 16384, "all"),
        ("z", "taylor", "wikitext", "", 16384, 50),
        ("z", "taylor + LoRA", "wikitext", "yahma/alpaca-cleaned", 16384, 50),
    ]
    dense = [r for r in rows if r["model"] == "dense"]
    assert {(r["calibration"], r["finetune data"]) for r in dense} == {("", "")}
    assert sorted(str(r["ppl tokens"]) for r in dense) == ["16384", "16384", "2048", "all"]


def sweep_of(*runs: tuple[str, dict]) -> list[dict]:
    """`dvc exp show --json` of a commit (the first run) with the others as its experiments."""
    (name, data), *rest = runs
    experiments = [{"revs": [{"rev": f"{i}" * 40, "name": n, "data": d}]} for i, (n, d) in enumerate(rest)]
    return [{"rev": "f" * 40, "name": name, "data": data, "experiments": experiments}]


def test_sort_puts_the_best_run_first_and_keeps_dense_on_top() -> None:
    runs = [
        (n, run(m, 0.2, ppl, n, "", ""))
        for n, m, ppl in (("a", "flap", 60.0), ("b", "taylor", 45.0), ("c", "random", 99.0))
    ]
    rows = experiment_rows(sweep_of(*runs))
    rows[2]["acc_average"] = 0.7  # b's
    del rows[3]["ppl_wiki_128"]  # c's: not measured, so last
    by_ppl = [(r["experiment"], r["model"], r.get("ppl_wiki_128")) for r in sort_rows(rows, "ppl_wiki_128")]
    assert by_ppl == [("a", "dense", 20.0), ("b", "taylor", 45.0), ("a", "flap", 60.0), ("c", "random", None)]
    assert [(r["experiment"], r["acc_average"]) for r in sort_rows(rows, "acc_average")] == [
        ("a", 0.6),
        ("b", 0.7),
        ("a", 0.55),
        ("c", 0.55),
    ]
    with pytest.raises(ValueError, match=r"no metric column 'ppl_wiki' to sort by; the table has: ppl_wiki_128, acc_"):
        sort_rows(rows, "ppl_wiki")


def test_best_runs_compare_only_rows_measured_alike() -> None:
    """A run over 2,048 tokens has the lowest perplexity, but it is not compared with runs over 16,384."""
    short = {"limit": 100, "max_tokens": 2048, "batch_size": 8}
    rows = experiment_rows(
        sweep_of(
            ("long", run("nirvana", 0.2, 50.0, "x", "x", "", evaluate={"limit": 100, "max_tokens": 16384})),
            ("short", run("nirvana", 0.2, 30.0, "y", "", "", evaluate=short)),
            ("big-batch", run("taylor", 0.2, 48.0, "z", "", "", evaluate=short | {"batch_size": 32})),
        )
    )
    lines = best_runs(rows)
    assert lines == [
        "Best of 2 pruned rows measured alike (ppl tokens 16384, zs limit 100): lowest ppl_wiki_128 45 "
        "(long: nirvana + LoRA at 0.2); highest acc_average 0.55 (long: nirvana at 0.2).",
        "Best of 2 pruned rows measured alike (ppl tokens 2048, zs limit 100): lowest ppl_wiki_128 30 "
        "(short: nirvana at 0.2); highest acc_average 0.55 (short: nirvana at 0.2).",
    ]
    other_model = run("nirvana", 0.2, 10.0, "w", "", "", model={"name_or_path": "gemma3-270m"})
    lines = best_runs(
        experiment_rows(sweep_of(("smol", run("nirvana", 0.2, 50.0, "x", "", "")), ("gemma", other_model)))
    )
    assert len(lines) == 2 and "model gemma3-270m" in lines[1] and "(gemma: nirvana at 0.2)" in lines[1]


def test_cli_report_sorts_summarises_and_names_a_missing_column(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = sweep_of(("a", run("flap", 0.2, 60.0, "x", "", "")), ("b", run("taylor", 0.2, 45.0, "y", "", "")))
    done = subprocess.CompletedProcess([], 0, stdout=json.dumps(shown), stderr="")
    monkeypatch.setattr(report, "dvc", lambda *args: done)  # report runs `dvc exp show --json` through sweep.dvc
    cli.main(["report", "--sort", "ppl_wiki_128"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split("|")[2].strip() for line in out[2:5]] == ["dense", "taylor", "flap"]
    assert out[-1] == (
        "Best of 2 pruned rows measured alike (zs limit 100): lowest ppl_wiki_128 45 (b: taylor at 0.2); "
        "highest acc_average 0.55 (b: taylor at 0.2)."
    )  # a tie goes to the row listed first
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", "--sort", "ppl_wiki"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("nirvana report: no metric column 'ppl_wiki' to sort by")


def test_report_reads_this_repository_experiments() -> None:
    """The real `dvc exp show --json` of this checkout: the committed run's rows carry its settings."""
    show = lambda *args: subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout  # noqa: E731
    params = yaml.safe_load(show("git", "show", "HEAD:params.yaml"))
    rows = experiment_rows(json.loads(show(sys.executable, "-m", "dvc", "exp", "show", "--json")))
    tokens = params["evaluate"]["max_tokens"] or "all"
    assert any(r["model"] == "dense" and r["ppl tokens"] == tokens for r in rows)
    pruned = [r for r in rows if r["model"] == params["method"] and r["ppl tokens"] == tokens]
    assert pruned and pruned[0]["calibration"] == report.calibration_label(params)
    assert best_runs(rows)[0].startswith("Best of ")


def test_llama_cpp_speedups_join_the_wide_table_only_for_the_model_they_measured() -> None:
    gguf = {
        "pruned_digest": "d",
        "threads": 2,
        "q8_0": {"pruned_prompt_speedup": 1.1, "pruned_gen_speedup": 1.2, "finetuned_prompt_speedup": 1.05}
        | {"finetuned_gen_speedup": 1.15, "dense": {"mib": 130.0}},
    }
    fresh = run("nirvana", 0.2, 30.0, "d", "d", "d")
    fresh["metrics"]["metrics/gguf.json"] = {"data": gguf}
    stale = run("flap", 0.4, 90.0, "new", "old", "old")
    stale["metrics"]["metrics/gguf.json"] = {"data": gguf}
    main = {"rev": "a" * 40, "name": "main", "data": fresh}
    other = {"rev": "b" * 40, "name": "exp-1", "data": stale}
    rows = experiment_rows([main, other])
    by = {(r["experiment"], r["model"]): r for r in rows}
    assert by[("main", "nirvana")]["speedup_llamacpp_q8_0_gen"] == 1.2
    assert by[("main", "nirvana + LoRA")]["speedup_llamacpp_q8_0_prompt"] == 1.05
    assert "speedup_llamacpp_q8_0_gen" not in by[("main", "dense")]
    assert "speedup_llamacpp_q8_0_gen" not in by[("exp-1", "flap")]  # gguf.json measured another pruned model
    assert "speedup_llamacpp_q8_0_gen" in markdown(rows, wide=True) and "llamacpp" not in markdown(rows)


def gguf_type(dense: float, pruned: float, finetuned: float, rounds: int, spread: float | None) -> dict:
    """One GGUF type of metrics/gguf.json joined with timings/gguf.json, llama.cpp perplexities as given."""
    models = {
        name: {"mib": mib, "fallbacks": 0, "ppl_wiki_128": ppl, "prompt_tokens_per_s": 600.4, "gen_tokens_per_s": 90.06}
        for name, mib, ppl in (("dense", 258.3, dense), ("pruned", 218.0, pruned), ("finetuned", 218.0, finetuned))
    }
    ratios = {"pruned_bytes_ratio": 1.185, "pruned_prompt_speedup": 1.0819, "pruned_gen_speedup": 1.1535}
    spreads = {"pruned_prompt_speedup_spread": spread, "pruned_gen_speedup_spread": spread}
    return models | ratios | spreads | {"rounds": rounds}


def test_the_llama_cpp_table_puts_both_perplexities_on_the_same_tokens_and_the_spreads() -> None:
    """The perplexity column says its window and token count, transformers' perplexity on those tokens beside
    llama.cpp's; each speedup comes with its spread and the rounds it took (none to show from one round)."""
    gguf = {
        "threads": 2,
        "ideal_flop_ratio": 1.1845,
        "ppl_tokens": 2048,
        "transformers": {name: {"ppl_wiki_128": ppl} for name, ppl in (("dense", 27.3), ("pruned", 53.0))}
        | {"finetuned": {"ppl_wiki_128": 40.6}},
        "f16": gguf_type(27.31, 53.02, 40.58, 5, 0.0213),
        "q8_0": gguf_type(27.46, 53.37, 40.74, 1, None),
    }
    lines = llamacpp_table(gguf)
    assert lines[2] == (
        "| type | model | MiB | wiki ppl @128, 2,048 tokens: llama.cpp | transformers | prompt tok/s "
        "| generation tok/s |"
    )
    assert lines[4] == "| f16 | dense | 258.3 | 27.31 | 27.30 | 600 | 90.1 |"
    assert lines[9] == "| q8_0 | finetuned | 218.0 | 40.74 | 40.60 | 600 | 90.1 |"
    assert lines[-2] == "- f16 (5 rounds): bytes x1.19, prompt x1.08 ± 0.02, generation x1.15 ± 0.02."
    assert lines[-1] == "- q8_0 (1 round): bytes x1.19, prompt x1.08, generation x1.15."
    assert llamacpp_table({"unsupported": "architecture 't5'"}) == ["No GGUF export for this model: architecture 't5'."]


def test_a_recovered_row_names_its_adapter_and_loss() -> None:
    """Next-token LoRA keeps the old label; distillation and full fine-tuning say so."""
    recipes = {"lm": {}, "full-kd": {"adapter": "full", "loss": "kd"}, "mix": {"loss": "mix"}}
    commits = [
        {"rev": name * 8, "name": name, "data": run("nirvana", 0.2, 30.0, "d", "d", "d", finetune=finetune)}
        for name, finetune in recipes.items()
    ]
    rows = experiment_rows(commits)
    tuned = [r["model"] for r in rows if r["experiment"] in recipes and r["model"] != "dense" and "+" in r["model"]]
    assert tuned == ["nirvana + LoRA", "nirvana + full kd", "nirvana + LoRA mix"]
