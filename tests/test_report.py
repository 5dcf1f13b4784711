"""`nirvana report`: one Markdown row per experiment from `dvc exp show --json`."""

from nirvana.report import experiment_rows, markdown


def commit(name: str, sparsity: float, ppl: float, speedup: float, experiments: list | None = None) -> dict:
    data = {
        "params": {"params.yaml": {"data": {"method": "nirvana", "sparsity": sparsity, "gamma": 3.0}}},
        "metrics": {
            "metrics/dense.json": {
                "data": {"params_total": 1_000_000, "ppl_wiki_128": 20.0, "acc_piqa": 0.6, "acc_average": 0.6}
            },
            "metrics/pruned.json": {
                "data": {"params_total": 800_000, "ppl_wiki_128": ppl, "acc_piqa": 0.55, "acc_average": 0.55}
            },
            "metrics/efficiency.json": {
                "data": {"speedup_prefill_bs1": speedup, "speedup_ideal": 1.3, "dense": {"prefill_bs1_ms": 5.0}}
            },
        },
    }
    return {"rev": "a" * 40, "name": name, "data": data, "experiments": experiments}


def test_rows_cover_dense_commits_and_experiments() -> None:
    experiment = {"revs": [{"rev": "b" * 40, "name": "exp-1", "data": commit("x", 0.4, 90.0, 1.5)["data"]}]}
    exp_show = [{"rev": "workspace", "data": {}}, commit("main", 0.2, 30.0, 1.1, [experiment])]
    rows = experiment_rows(exp_show)
    assert [r["experiment"] for r in rows] == ["dense", "main", "exp-1"]
    assert rows[0]["ppl_wiki_128"] == 20.0 and "speedup_ideal" not in rows[0]
    assert rows[2]["sparsity"] == 0.4 and rows[2]["ppl_wiki_128"] == 90.0 and rows[2]["speedup_prefill_bs1"] == 1.5
    table = markdown(rows).splitlines()
    assert table[0].startswith("| experiment | method | sparsity | gamma | params | ppl_wiki_128 | acc_piqa")
    assert table[2] == "| dense | dense | 0 |  | 1.0 M | 20 | 0.6 | 0.6 |  |  |"
    assert table[4].startswith("| exp-1 | nirvana | 0.4 | 3 | 0.8 M | 90 | 0.55 | 0.55 | 1.5 | 1.3 |")
