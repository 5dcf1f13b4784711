"""Choosing the plan by held-out KL: gamma: auto and several criteria in `method` (nirvana.method.selection),
and the KL itself (nirvana.method.kl)."""

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import PreTrainedModel

from conftest import DECODERS, random_plan, random_text, save_tokenizer, tiny_decoder, tiny_llama
from nirvana.core.io import write_parquet
from nirvana.core.params import AllocationParams, CalibrationParams, Params, SaliencyParams, defaults
from nirvana.evaluation.perplexity import param_counts
from nirvana.method.calibration import judging_run, search_candidates, search_winner
from nirvana.method.criteria import CRITERIA
from nirvana.method.kl import BLOCK, HeldOut, Reference, log_probs, shared_layers
from nirvana.method.plan import plan_for
from nirvana.method.selection import by_method, candidate_runs, coarse_to_fine, plan_metrics, select_plan
from nirvana.method.surgery import prune_model
from nirvana.models import get_adapter

KL_WINDOWS = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(5))
WINDOWS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(6))
GAMMAS = [0.5, 1.0, 3.0, 8.0]


def auto(gammas: list[float] = GAMMAS, **changes) -> Params:
    """gamma: auto over `gammas`, single MLP channels, so that each gamma makes its own plan."""
    allocation = defaults(AllocationParams, mlp_multiple=1, gamma_candidates=gammas)
    return defaults(Params, **{"sparsity": 0.4, "gamma": "auto", "allocation": allocation, **changes})


def kl_of(model, scores: pd.DataFrame, run: Params, held_out: HeldOut, windows: torch.Tensor = WINDOWS) -> float:
    """The KL of one run's plan, computed from scratch."""
    pruned = copy.deepcopy(model)
    prune_model(pruned, plan_for(pruned, scores, run, 0.4, windows))
    return held_out.kl(pruned)


def test_auto_keeps_the_gamma_of_lowest_kl_among_those_it_visits() -> None:
    model = tiny_llama("gqa")
    scores = CRITERIA["nirvana"](model, WINDOWS, 2)
    held_out = HeldOut.of(model, KL_WINDOWS, 4)
    full = [kl_of(model, scores, dataclasses.replace(auto(), gamma=g), held_out) for g in GAMMAS]
    plan, table = select_plan(model, {"nirvana": scores}, auto(), 0.4, WINDOWS, held_out)
    visited = coarse_to_fine(len(GAMMAS), full.__getitem__)
    assert table["gamma"].tolist() == [GAMMAS[i] for i in visited] and table["kl"].nunique() == len(visited)
    assert table["kl"].tolist() == pytest.approx(list(visited.values()), rel=1e-6)
    best = table.loc[table["kl"].idxmin()]
    assert table["selected"].sum() == 1 and table.loc[table["selected"], "gamma"].item() == best.gamma
    expected = plan_for(model, scores, dataclasses.replace(auto(), gamma=best.gamma), 0.4)
    pd.testing.assert_frame_equal(plan, expected)
    # a higher gamma takes more from the MLP and less from attention
    assert table["mlp_kept"].is_monotonic_decreasing and table["attn_kept"].is_monotonic_increasing
    assert table["mlp_kept"].iloc[0] > table["mlp_kept"].iloc[-1]
    metrics = plan_metrics(table)
    assert metrics["gamma"] == best.gamma and metrics["kl_selected"] == best.kl == table["kl"].min()
    assert metrics["kl_runner_up"] == sorted(table["kl"])[1] and metrics["kl_worst"] == table["kl"].max()


def test_coarse_to_fine_visits_every_other_gamma_then_the_neighbours_of_the_best() -> None:
    valley = [9, 8, 7, 5, 4, 6, 7, 8, 9]  # the minimum sits between coarse points 2 and 4: found
    assert list(coarse_to_fine(9, valley.__getitem__)) == [0, 2, 3, 4, 5, 6, 8]
    assert min(coarse_to_fine(9, [9, 8, 7, 3, 4, 6, 7, 8, 9].__getitem__).items(), key=lambda kv: kv[1]) == (3, 3)
    # a dip away from the coarse minimum's neighbours is missed, as the docstring says
    dip = [1, 5, 2, 5, 5, 5, 5, 0, 5]
    assert min(coarse_to_fine(9, dip.__getitem__).values()) == 1 and 7 not in coarse_to_fine(9, dip.__getitem__)
    assert list(coarse_to_fine(2, [2, 1].__getitem__)) == [0, 1] and list(coarse_to_fine(1, [0].__getitem__)) == [0]
    equal = coarse_to_fine(5, lambda i: 1.0)  # ties: the lowest gamma, and only its neighbour is added
    assert list(equal) == [0, 1, 2, 4]


def test_a_plan_whose_kl_is_known_is_not_pruned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """allocate_sparsity takes the search's KL for the winning set's judged plan; a plan of other units
    (another digest) is measured."""
    model = tiny_llama("gqa")
    scores = CRITERIA["nirvana"](model, WINDOWS, 2)
    held_out = HeldOut.of(model, KL_WINDOWS, 4)
    _, measured = select_plan(model, {"nirvana": scores}, auto(), 0.4, WINDOWS, held_out)
    known = measured[measured["gamma"] == 3.0].assign(kl=0.0)  # below any measured KL: it wins
    calls = []
    kl = HeldOut.kl
    monkeypatch.setattr(HeldOut, "kl", lambda self, m: calls.append(1) or kl(self, m))
    _, table = select_plan(model, {"nirvana": scores}, auto(), 0.4, WINDOWS, held_out, known=known)
    assert len(calls) == len(table) - 1 and table.loc[table["gamma"] == 3.0, "kl"].item() == 0.0
    assert table["selected"].tolist() == (table["kl"] == 0.0).tolist()
    calls.clear()
    _, other = select_plan(
        model, {"nirvana": scores}, auto(), 0.4, WINDOWS, held_out, known=known.assign(plan_digest="0" * 16)
    )
    assert len(calls) == len(other) and 0.0 not in other["kl"].tolist()


def test_the_realised_sparsity_is_what_prune_measures() -> None:
    model = tiny_llama("gqa_bias")
    scores = CRITERIA["magnitude"](model, WINDOWS, 2)
    _, table = select_plan(
        model, {"magnitude": scores}, auto(method="magnitude"), 0.4, WINDOWS, HeldOut.of(model, KL_WINDOWS, 6)
    )
    for row in table.itertuples():
        pruned = copy.deepcopy(model)
        prune_model(pruned, plan_for(pruned, scores, auto(method="magnitude", gamma=row.gamma), 0.4))
        realised = 1 - param_counts(pruned)["params_attn_mlp"] / param_counts(model)["params_attn_mlp"]
        assert row.sparsity_realised == pytest.approx(realised, abs=1e-6)
        assert abs(realised - 0.4) < 0.05


def test_auto_with_one_candidate_is_the_fixed_gamma_plan_and_measures_nothing() -> None:
    model = tiny_llama("gqa")
    scores = CRITERIA["nirvana"](model, WINDOWS, 2)
    fixed = defaults(Params, sparsity=0.4, gamma=2.0, allocation=defaults(AllocationParams, mlp_multiple=1))
    assert [(r.method, r.gamma) for r in candidate_runs(auto([2.0]))] == [("nirvana", 2.0)]
    plan, table = select_plan(model, {"nirvana": scores}, auto([2.0]), 0.4)
    pd.testing.assert_frame_equal(plan, plan_for(model, scores, fixed, 0.4))
    assert table["selected"].all() and table["kl"].isna().all() and table["gamma"].tolist() == [2.0]
    realised = table["sparsity_realised"].item()
    assert plan_metrics(table) == {"choices": 1, "method": "nirvana", "gamma": 2.0, "sparsity_realised": realised}


def test_candidate_runs_cross_criteria_with_gammas_only_under_nirvanas_allocation() -> None:
    runs = candidate_runs(auto([1.0, 4.0], method=["nirvana", "taylor", "flap"]))
    assert [(r.method, r.gamma) for r in runs] == [
        ("nirvana", 1.0),
        ("nirvana", 4.0),
        ("taylor", "auto"),  # LLM-Pruner's band allocation has no gamma
        ("flap", "auto"),
    ]
    forced = auto(
        [1.0, 4.0],
        method=["nirvana", "taylor"],
        allocation=defaults(AllocationParams, mode="nirvana", gamma_candidates=[1.0, 4.0]),
    )
    assert [(r.method, r.gamma) for r in candidate_runs(forced)] == [
        ("nirvana", 1.0),
        ("nirvana", 4.0),
        ("taylor", 1.0),
        ("taylor", 4.0),
    ]
    assert [(r.method, r.gamma) for r in candidate_runs(defaults(Params, gamma=2.5))] == [("nirvana", 2.5)]


def test_several_criteria_each_under_its_own_allocation() -> None:
    model = tiny_llama("gqa")
    params = defaults(
        Params,
        method=["magnitude", "taylor", "wanda_sp"],
        sparsity=0.4,
        gamma=3.0,
        allocation=defaults(AllocationParams, mlp_multiple=1),
    )
    scores = {m: CRITERIA[m](model, WINDOWS, 2) for m in params.methods}
    held_out = HeldOut.of(model, KL_WINDOWS, 3)
    dense = copy.deepcopy(model)
    _, table = select_plan(model, scores, params, 0.4, WINDOWS, held_out)
    assert table[["method", "allocation"]].values.tolist() == [
        ["magnitude", "nirvana"],
        ["taylor", "llm_pruner"],
        ["wanda_sp", "uniform"],
    ]
    assert table["gamma"].tolist()[0] == 3.0 and table["gamma"].iloc[1:].isna().all()
    for row, run in zip(table.itertuples(), candidate_runs(params), strict=True):
        assert row.kl == pytest.approx(kl_of(model, scores[row.method], run, held_out), rel=1e-6)
    winner = table.loc[table["kl"].idxmin()]
    assert table.loc[table["selected"], "method"].item() == winner.method
    # Wanda-sp's layer-by-layer plan zeroes units in the model it is made on: a copy, never the dense model
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), dense.parameters(), strict=True))


def test_the_calibration_search_judges_each_candidate_at_the_middle_gamma(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saliency once per candidate set and criterion; with gamma: auto one pruned pass per set, at the
    middle of gamma_candidates, and allocate_sparsity can reuse the winner's (`search_winner`)."""
    calls = []
    nirvana = CRITERIA["nirvana"]
    monkeypatch.setitem(CRITERIA, "nirvana", lambda *args: calls.append(1) or nirvana(*args))
    pool = torch.randint(0, 64, (30, 10), generator=torch.Generator().manual_seed(7))
    params = auto(calibration=defaults(CalibrationParams, num_samples=4, candidates=3, kl_batch_size=3))
    assert judging_run(params).gamma == 3.0 and judging_run(defaults(Params, gamma=2.5)).gamma == 2.5
    model = tiny_llama("gqa")
    table = search_candidates(model, pool, KL_WINDOWS, params)
    assert len(calls) == 3 and table["gamma"].tolist() == [3.0] * 3 and table["search_sparsity"].tolist() == [0.4] * 3
    held_out = HeldOut.of(model, KL_WINDOWS, 3)
    for row in table.itertuples():
        windows = pool[torch.tensor(row.windows)]
        run = dataclasses.replace(params, gamma=3.0)
        assert row.kl == pytest.approx(kl_of(model, nirvana(model, windows, 4), run, held_out, windows), rel=1e-6)
    assert table.loc[table["selected"], "kl"].item() == table["kl"].min()
    assert search_winner(table, 0.4)["candidate"].tolist() == table.loc[table["selected"], "candidate"].tolist()
    assert search_winner(table, 0.3) is None  # judged at another sparsity (calibration.select_at_sparsity)


def test_by_method_splits_the_saliency_table() -> None:
    a = pd.DataFrame({"layer": [0], "module": ["mlp"], "unit": [0], "score": [1.0], "method": ["nirvana"]})
    b = a.assign(score=2.0, method="flap", input_mean=0.5)
    split = by_method(pd.concat([a, b], ignore_index=True))
    assert list(split) == ["nirvana", "flap"]
    assert list(split["nirvana"].columns) == ["layer", "module", "unit", "score"]
    assert split["flap"]["input_mean"].tolist() == [0.5] and split["flap"].index.tolist() == [0]


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / f"stages/{name}.py")
    assert spec is not None and spec.loader is not None
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def test_compute_saliency_scores_every_criterion_of_a_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama("gqa")
    model.save_pretrained(tmp_path / "model")
    pd.DataFrame({"input_ids": WINDOWS.tolist()}).to_parquet(tmp_path / "calibration.parquet")
    monkeypatch.chdir(tmp_path)
    params = defaults(Params, method=["taylor", "flap"], saliency=defaults(SaliencyParams, batch_size=2))
    load_stage("compute_saliency").main(params, "model", "calibration.parquet", "saliency.parquet")
    scores = by_method(pd.read_parquet("saliency.parquet"))
    assert list(scores) == ["taylor", "flap"]
    for method, table in scores.items():
        pd.testing.assert_frame_equal(table, CRITERIA[method](model, WINDOWS, 2), check_exact=False, rtol=1e-6)


def test_the_stage_searches_without_a_backward_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """allocate_sparsity with gamma: auto reuses compute_saliency's scores (a backward pass would fail here)
    and the search's KL of the winning set's judged plan (a sentinel KL here)."""
    model = tiny_llama("gqa")
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tmp_path / "model")
    pd.DataFrame({"text": [random_text(400, seed) for seed in range(6)]}).to_parquet(tmp_path / "pool.parquet")
    pd.DataFrame({"input_ids": WINDOWS.tolist()}).to_parquet(tmp_path / "calibration.parquet")
    scores = CRITERIA["nirvana"](model, WINDOWS, 2)
    write_parquet(scores.assign(method="nirvana"), tmp_path / "saliency.parquet")
    params = auto(calibration=defaults(CalibrationParams, kl_samples=4, kl_seq_len=16, kl_batch_size=2))
    _, judged = select_plan(model, {"nirvana": scores}, judging_run(params), 0.4)
    judged = judged.assign(candidate=0, kl=0.125, search_sparsity=0.4)
    write_parquet(judged, tmp_path / "candidates.parquet")
    stage = load_stage("allocate_sparsity")

    def no_backward(*args, **kwargs):
        raise AssertionError("a backward pass")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    monkeypatch.chdir(tmp_path)
    outs = ["plan.parquet", "plans.parquet", "plan.json", "widths.csv"]
    stage.main(params, "model", "calibration.parquet", "pool.parquet", "candidates.parquet", "saliency.parquet", *outs)
    table, metrics = pd.read_parquet("plans.parquet"), json.loads(Path("plan.json").read_text())
    assert {0.5, 3.0, 8.0} <= set(table["gamma"]) and metrics["choices"] == len(table)  # coarse points, at least
    assert table.loc[table["gamma"] == 3.0, "kl"].item() == 0.125  # not measured again
    assert metrics["gamma"] == table.loc[table["kl"].idxmin(), "gamma"]
    assert pd.read_parquet("plan.parquet")["keep"].sum() < len(pd.read_parquet("plan.parquet"))


def test_a_token_the_dense_model_rules_out_adds_nothing_to_the_kl() -> None:
    """A reference with p = 0 at a token (log p = -inf, e.g. a masked token): its term is 0, not 0 x -inf = NaN.
    Token 5 masked and the rest renormalised, KL(p' || p) = -log(1 - p_5) at each position."""
    model = tiny_llama("gqa")
    dense = list(log_probs(model, KL_WINDOWS, 4))
    masked = [torch.log_softmax(chunk.index_fill(-1, torch.tensor([5]), float("-inf")), -1) for chunk in dense]
    expected = -torch.log1p(-torch.cat(dense)[..., 5].exp()).mean().item()
    assert HeldOut(KL_WINDOWS, [Reference.of(m) for m in masked], 4).kl(model) == pytest.approx(expected, rel=1e-4)


def plain_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """sum p (log p - log q) in float64, a term with p = 0 adding 0: the definition the KL is held to."""
    log_p, log_q = log_p.double(), log_q.double()
    return torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), 0.0).sum().item()


def distributions(vocab: int, scale: float, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense and pruned log-probabilities of 4 x 16 tokens: logits of spread `scale`, the pruned ones moved by
    `noise` x `scale`; at scale 40 and above many p underflow to 0 in float32."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 16, vocab, generator=gen) * scale
    moved = logits + torch.randn(logits.shape, generator=gen) * noise * scale
    return logits.log_softmax(-1), moved.log_softmax(-1)


@pytest.mark.parametrize(
    ("vocab", "scale", "noise"),
    [
        (49152, 1.0, 1.0),  # SmolLM2's vocabulary, KL about the entropy
        (49152, 1.0, 0.1),  # a KL 2,000 times below the entropy: float32 sums would be off by 3e-6
        (49152, 40.0, 0.1),  # most p = 0, extreme logits
        (1000, 300.0, 1.0),  # blocks of 8
        (997, 3.0, 0.5),  # a prime vocabulary: float64 over every entry
    ],
)
def test_the_kl_is_the_plain_formula_to_a_millionth(vocab: int, scale: float, noise: float) -> None:
    log_p, log_q = distributions(vocab, scale, noise, seed=vocab)
    assert scale < 40 or (log_p.exp() == 0).any()
    kl = Reference.of(log_p.clone()).kl_sum(log_q.clone())
    assert kl == pytest.approx(plain_kl(log_p, log_q), rel=1e-6) and kl > 0


def test_ruled_out_tokens_add_nothing_where_p_is_0_and_everything_where_it_is_not() -> None:
    """log q = -inf where p = 0 adds 0 (not 0 x -inf = NaN); where p > 0 the KL is infinite."""
    log_p, log_q = distributions(3 * BLOCK, 2.0, 1.0, seed=1)
    log_p[0, 0, 7], log_q[0, 0, 7] = -torch.inf, -torch.inf
    log_p, log_q = log_p.log_softmax(-1), log_q.log_softmax(-1)
    kl = Reference.of(log_p.clone()).kl_sum(log_q.clone())
    assert kl == pytest.approx(plain_kl(log_p, log_q), rel=1e-6)
    log_q[1, 2, 9] = -torch.inf
    assert Reference.of(log_p.clone()).kl_sum(log_q.clone()) == torch.inf == plain_kl(log_p, log_q)


def dense_first_layer(model_type: str) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A tiny decoder and a copy pruned everywhere but in its first layer."""
    model = tiny_decoder(model_type)
    plan = random_plan(model, seed=3)
    plan.loc[plan["layer"] == 0, "keep"] = True
    pruned = copy.deepcopy(model)
    prune_model(pruned, plan)
    return model, pruned


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_the_dense_layers_a_plan_keeps_are_replayed_bit_for_bit(model_type: str) -> None:
    """The first plan runs the layers it shares with the dense model and records their outputs; the next skips
    them (their modules are not called) and gets the same bits as a KL set without the dense model's outputs."""
    model, pruned = dense_first_layer(model_type)
    held_out = HeldOut.of(model, KL_WINDOWS, 4)
    plain = HeldOut(KL_WINDOWS, held_out.reference, 4).kl(pruned)
    calls = []
    layer = get_adapter(pruned.config).layers(pruned)[0]
    layer.mlp.register_forward_hook(lambda *args: calls.append(1))
    assert held_out.kl(pruned) == plain and len(calls) == 2 and list(held_out.prefixes) == [1]
    calls.clear()
    assert held_out.kl(pruned) == plain and not calls and "forward" not in vars(layer)
    assert held_out.kl(copy.deepcopy(pruned)) == plain and not calls


def test_a_layer_that_differs_from_the_dense_one_is_not_replayed() -> None:
    model, pruned = dense_first_layer("llama")
    held_out = HeldOut.of(model, KL_WINDOWS, 4)
    held_out.kl(pruned)
    changed = copy.deepcopy(pruned)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert shared_layers(pruned, model) and not shared_layers(changed, model)
    assert held_out.kl(changed) == HeldOut(KL_WINDOWS, held_out.reference, 4).kl(changed) != held_out.kl(pruned)
    changed = copy.deepcopy(pruned)
    with torch.no_grad():
        changed.model.norm.weight[0] += 1.0  # outside the layers
    assert not shared_layers(changed, model)
