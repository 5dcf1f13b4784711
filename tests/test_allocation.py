"""Allocation: the requested share, p_mlp = gamma * p_attn, guards, exact and stable counts; the uniform
and FLAP modes; and which mode a null `allocation.mode` means."""

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_llama
from nirvana.core.params import METHODS, AllocationParams, Params, defaults
from nirvana.method.allocation import (
    allocate,
    allocate_flap,
    allocate_uniform,
    allocation_mode,
    check_reachable,
    llm_pruner_band,
    max_sparsity,
    plan_widths,
    pool_fractions,
    standardise,
    uniform_counts,
)

LAYERS, HEADS, CHANNELS = 6, 4, 64
A, M = 1000, 30  # parameters per attention unit and per MLP channel


def scores(seed: int = 0, ties: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [
        (layer, module, unit)
        for layer in range(LAYERS)
        for module, n in (("attn", HEADS), ("mlp", CHANNELS))
        for unit in range(n)
    ]
    df = pd.DataFrame(rows, columns=["layer", "module", "unit"])
    df["score"] = 1.0 if ties else rng.gamma(2.0, size=len(df))
    return df


def removed_params(plan: pd.DataFrame) -> int:
    gone = plan[~plan.keep]
    return A * (gone.module == "attn").sum() + M * (gone.module == "mlp").sum()


@pytest.mark.parametrize("sparsity,gamma", [(0.1, 1.0), (0.2, 3.0), (0.4, 3.0), (0.5, 0.5)])
def test_fractions_keep_gamma_and_budget(sparsity: float, gamma: float) -> None:
    n_a, n_m = LAYERS * HEADS, LAYERS * CHANNELS
    p_a, p_m = pool_fractions(sparsity, gamma, A, n_a, M, n_m)
    assert p_m == pytest.approx(gamma * p_a)
    assert A * n_a * p_a + M * n_m * p_m == pytest.approx(sparsity * (A * n_a + M * n_m))


def test_fractions_clip_mlp_and_give_the_rest_to_attention() -> None:
    p_a, p_m = pool_fractions(0.6, 10.0, A, 24, M, 384)
    assert p_m == 1.0
    assert A * 24 * p_a + M * 384 == pytest.approx(0.6 * (A * 24 + M * 384))


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3, 0.4])
def test_removes_the_requested_share_within_one_unit(sparsity: float) -> None:
    plan = allocate(scores(), sparsity, 3.0, A, M, mlp_multiple=1)
    target = sparsity * (A * LAYERS * HEADS + M * LAYERS * CHANNELS)
    assert abs(removed_params(plan) - target) <= max(A, M) / 2 + M
    p_a, p_m = pool_fractions(sparsity, 3.0, A, LAYERS * HEADS, M, LAYERS * CHANNELS)
    gone = plan[~plan.keep]
    assert (gone.module == "attn").sum() == round(p_a * LAYERS * HEADS)
    assert (gone.module == "mlp").sum() == round(p_m * LAYERS * CHANNELS)


@pytest.mark.parametrize("multiple", [1, 2])
@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
def test_attention_cap_gives_the_rest_to_the_mlp(gamma: float, multiple: int) -> None:
    """At low gamma attention would remove more than its removable share (each layer keeps its best
    unit, or block): the MLP takes the rest, so the budget is met to one unit."""
    sparsity = 0.5
    plan = allocate(scores(seed=5), sparsity, gamma, A, M, mlp_multiple=1, attn_multiple=multiple)
    target = sparsity * (A * LAYERS * HEADS + M * LAYERS * CHANNELS)
    assert removed_params(plan) == pytest.approx(target, abs=A * multiple / 2 + M)
    assert (plan_widths(plan).attn_kept >= multiple).all()


def test_fractions_clip_attention_and_give_the_rest_to_the_mlp() -> None:
    p_a, p_m = pool_fractions(0.5, 0.5, A, 24, M, 384, attn_cap=0.5)
    assert p_a == 0.5
    assert A * 24 * p_a + M * 384 * p_m == pytest.approx(0.5 * (A * 24 + M * 384))


def test_lowest_scores_go_first() -> None:
    df = scores(seed=1)
    plan = allocate(df, 0.2, 3.0, A, M, mlp_multiple=1)
    for module in ("attn", "mlp"):
        part = plan[plan.module == module]
        guarded = part.groupby("layer")["score"].transform("max") == part.score
        assert part[~part.keep].score.max() <= part[part.keep & ~guarded].score.min()


def test_guards_at_extreme_sparsity() -> None:
    df = scores(seed=2)
    df.loc[(df.layer == 0), "score"] = 0.0  # layer 0 scores lowest everywhere
    plan = allocate(df, 0.95, 3.0, A, M, mlp_multiple=8)
    widths = plan_widths(plan)
    assert (widths.attn_kept >= 1).all() and (widths.mlp_kept >= 8).all()
    assert (widths.mlp_kept % 8 == 0).all()
    for layer, part in plan[plan.module == "attn"].groupby("layer"):
        assert part[part.keep].score.max() == part.score.max(), f"layer {layer} lost its best unit"


@pytest.mark.parametrize("multiple", [4, 8])
def test_mlp_widths_are_multiples_and_the_count_stays_close(multiple: int) -> None:
    plan = allocate(scores(seed=3), 0.3, 3.0, A, M, mlp_multiple=multiple)
    widths = plan_widths(plan)
    assert (widths.mlp_kept % multiple == 0).all()
    _, p_m = pool_fractions(0.3, 3.0, A, LAYERS * HEADS, M, LAYERS * CHANNELS)
    removed = (~plan.keep & (plan.module == "mlp")).sum()
    assert abs(removed - round(p_m * LAYERS * CHANNELS)) <= multiple / 2


def test_odd_widths_round_the_kept_count_to_the_multiple() -> None:
    df = scores(seed=4)
    df = df[~((df.module == "mlp") & (df.unit >= 60))].reset_index(drop=True)  # 60 channels a layer
    widths = plan_widths(allocate(df, 0.3, 3.0, A, M, mlp_multiple=8))
    assert (widths.mlp_kept % 8 == 0).all()


def test_ties_break_by_index_and_the_count_is_exact() -> None:
    first = allocate(scores(ties=True), 0.25, 2.0, A, M, mlp_multiple=1)
    again = allocate(scores(ties=True).sample(frac=1, random_state=0).sort_index(), 0.25, 2.0, A, M, 1)
    pd.testing.assert_frame_equal(first, again)
    p_a, _ = pool_fractions(0.25, 2.0, A, LAYERS * HEADS, M, LAYERS * CHANNELS)
    attn = first[first.module == "attn"]
    assert (~attn.keep).sum() == round(p_a * LAYERS * HEADS)
    gone = attn[~attn.keep]
    assert gone.layer.min() == 0 and (gone.sort_values(["layer", "unit"]).index == gone.index).all()


# SmolLM2-135M's shape: 30 layers of 3 KV-group units (9 query heads of 64) and 1536 channels, hidden 576.
SMOL = dict(layers=30, heads=3, channels=1536, attn=512 * 576, mlp=3 * 576)


def smol_scores(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [
        (layer, module, unit)
        for layer in range(SMOL["layers"])
        for module, n in (("attn", SMOL["heads"]), ("mlp", SMOL["channels"]))
        for unit in range(n)
    ]
    df = pd.DataFrame(rows, columns=["layer", "module", "unit"])
    df["score"] = rng.gamma(2.0, size=len(df)) * (1 + df.layer)  # deeper layers score higher, as in LLMs
    return df


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("mode", ["nirvana", "uniform", "llm_pruner", "flap"])
def test_every_mode_meets_the_budget_on_the_smollm2_shape(mode: str, sparsity: float) -> None:
    df = smol_scores(seed=5)
    a, m, multiple = SMOL["attn"], SMOL["mlp"], 8
    plan = {
        "nirvana": lambda: allocate(df, sparsity, 3.0, a, m, multiple),
        "uniform": lambda: allocate_uniform(df, sparsity, a, m, multiple),
        "llm_pruner": lambda: allocate_uniform(df, sparsity, a, m, multiple, band=llm_pruner_band(SMOL["layers"])),
        "flap": lambda: allocate_flap(df, sparsity, a, m, multiple),
    }[mode]()
    gone = plan[~plan.keep]
    removed = a * (gone.module == "attn").sum() + m * (gone.module == "mlp").sum()
    budget = sparsity * SMOL["layers"] * (a * SMOL["heads"] + m * SMOL["channels"])
    assert abs(removed - budget) <= a / 2 + multiple * m
    widths = plan_widths(plan)
    assert (widths.attn_kept >= 1).all() and (widths.mlp_kept >= multiple).all()


@pytest.mark.parametrize("sparsity", [0.85, 0.9, 0.912])
def test_nirvana_meets_the_budget_up_to_the_guards(sparsity: float) -> None:
    """When p_mlp hits the MLP guards (8 channels kept per layer) attention takes the rest, so any
    sparsity up to the most the guards allow (0.91276 here) is met; clipping at 1 fell short at 0.9."""
    a, m, multiple = SMOL["attn"], SMOL["mlp"], 8
    plan = allocate(smol_scores(seed=6), sparsity, 3.0, a, m, multiple)
    gone = plan[~plan.keep]
    removed = a * (gone.module == "attn").sum() + m * (gone.module == "mlp").sum()
    assert abs(removed - sparsity * SMOL["layers"] * (a * SMOL["heads"] + m * SMOL["channels"])) <= a / 2 + multiple * m


def test_max_sparsity_by_hand() -> None:
    """Tiny GQA Llama: 2 groups of 768 parameters and 40 MLP channels of 72 per layer; one group and
    `mlp_multiple` channels stay."""
    model = tiny_llama("gqa")
    assert max_sparsity(model, 8, 1) == pytest.approx((768 + 32 * 72) / (2 * 768 + 40 * 72))
    assert max_sparsity(model, 40, 1) == pytest.approx(768 / (2 * 768 + 40 * 72))
    assert max_sparsity(model, 1, 2) == pytest.approx(39 * 72 / (2 * 768 + 40 * 72))  # 2 units: none goes


def test_uniform_counts_by_hand() -> None:
    # SmolLM2 at 0.2: round(0.2 * 3) = 1 unit a layer; the MLP takes the rest, 238.9 -> 239 channels;
    # the aligned 240 would move the total by 30 channels, more than one block of 8: budget first.
    assert uniform_counts(0.2, 30, SMOL["attn"], 3, SMOL["mlp"], 1536, 8) == (1, 239)
    # 2 layers, 2 units of 768, 40 channels of 72 at 0.2: no unit (round(0.4)); 12.27 channels a layer,
    # the aligned 16 (24 kept) moves the total by 2 x 4 = 8 channels, one block: aligned.
    assert uniform_counts(0.2, 2, 768, 2, 72, 40, 8) == (0, 16)
    # Attention alone would overshoot the whole budget (1 unit of 1000 > 0.3 x 3000): it removes none and
    # the MLP takes all 900; unless the MLP cannot (624 > 7 of 8 channels): then the unit goes after all.
    assert uniform_counts(0.3, 1, 1000, 2, 10, 100, 1) == (0, 90)
    assert uniform_counts(0.3, 1, 1000, 2, 10, 8, 1) == (1, 0)


def test_uniform_removes_the_same_lowest_units_in_every_layer() -> None:
    df = scores(seed=6)
    df.loc[df.layer == 0, "score"] *= 100  # a layer that scores high everywhere still loses its share
    plan = allocate_uniform(df, 0.3, A, M, mlp_multiple=1)
    attn_count, mlp_count = uniform_counts(0.3, LAYERS, A, HEADS, M, CHANNELS, 1)
    widths = plan_widths(plan)
    assert (widths.attn_kept == HEADS - attn_count).all() and (widths.mlp_kept == CHANNELS - mlp_count).all()
    for _, part in plan.groupby(["layer", "module"]):
        assert part[~part.keep].score.max() < part[part.keep].score.min()
    pd.testing.assert_frame_equal(plan, allocate_uniform(df, 0.3, A, M, mlp_multiple=1))


def test_llm_pruner_band_scales_its_llama_defaults_to_the_depth() -> None:
    assert llm_pruner_band(32) == (4, 30)  # LLM-Pruner's README: --block_*_layer_start 4 --..._end 30
    assert llm_pruner_band(30) == (4, 28)  # SmolLM2: 3.75 -> 4, 28.1 -> 28
    assert llm_pruner_band(2) == (0, 2)
    assert llm_pruner_band(30, [2, 10]) == (2, 10)


def test_llm_pruner_prunes_the_band_uniformly_and_keeps_the_rest_dense() -> None:
    """Layers 1-4 of 6 lose the same lowest units; layers 0 and 5 keep all; the whole model's budget is
    met, so the band's own ratio is higher (0.3 x 6/4 = 0.45)."""
    df = scores(seed=13)
    plan = allocate_uniform(df, 0.3, A, M, mlp_multiple=1, band=(1, 5))
    widths = plan_widths(plan).set_index("layer")
    assert (widths.loc[[0, 5], "attn_kept"] == HEADS).all() and (widths.loc[[0, 5], "mlp_kept"] == CHANNELS).all()
    attn, mlp = uniform_counts(0.45, 4, A, HEADS, M, CHANNELS, 1)
    assert (widths.loc[1:4, "attn_kept"] == HEADS - attn).all() and (
        widths.loc[1:4, "mlp_kept"] == CHANNELS - mlp
    ).all()
    assert abs(removed_params(plan) - 0.3 * LAYERS * (A * HEADS + M * CHANNELS)) <= 4 * M
    for _, part in plan[plan.layer.between(1, 4)].groupby(["layer", "module"]):
        assert part[~part.keep].score.max() < part[part.keep].score.min()


def test_llm_pruner_refuses_a_band_past_the_model_or_a_sparsity_it_cannot_reach() -> None:
    from nirvana.core.errors import InputError

    model = tiny_llama("gqa")  # 2 layers
    with pytest.raises(InputError, match=r"allocation.band = \[0, 3\] ends past this model's 2 layers"):
        check_reachable(model, defaults(Params, method="taylor", allocation=defaults(AllocationParams, band=[0, 3])))
    tiny = defaults(AllocationParams, mlp_multiple=8)  # the tiny model has 40 MLP channels a layer
    half = defaults(Params, method="taylor", sparsity=0.4, allocation=defaults(AllocationParams, band=[1, 2]))
    with pytest.raises(InputError, match=r"sparsity = 0.4 is unreachable.*only layers 1-1 are pruned"):
        check_reachable(model, half)
    check_reachable(model, defaults(Params, method="taylor", sparsity=0.4, allocation=tiny))  # the default band


def test_standardise_per_layer_and_module() -> None:
    df = scores(seed=7)
    df.loc[(df.layer == 2) & (df.module == "attn"), "score"] = 5.0  # a constant group
    z = standardise(df)
    for (layer, module), part in z.groupby([df.layer, df.module]):
        if (layer, module) == (2, "attn"):
            assert (part == 0).all()
        else:
            assert part.mean() == pytest.approx(0, abs=1e-12) and part.std() == pytest.approx(1)
    raw = df.score[(df.layer == 1) & (df.module == "mlp")]
    assert z[raw.index[0]] == pytest.approx((raw.iloc[0] - raw.mean()) / raw.std(ddof=1))


def test_flap_threshold_is_global_on_standardised_scores_and_closest_to_the_budget() -> None:
    df = scores(seed=8)
    plan = allocate_flap(df, 0.3, A, M, mlp_multiple=1)
    # Rescaling one layer changes no standardised score, hence no decision.
    rescaled = df.assign(score=np.where(df.layer == 3, df.score * 1000 + 7, df.score))
    pd.testing.assert_series_equal(allocate_flap(rescaled, 0.3, A, M, mlp_multiple=1).keep, plan.keep)
    z = standardise(df)
    best = z.groupby([df.layer, df.module]).transform("max") == z  # each layer keeps its best unit
    assert z[~plan.keep].max() <= z[plan.keep & ~best].min()
    gone = plan[~plan.keep]
    removed = A * (gone.module == "attn").sum() + M * (gone.module == "mlp").sum()
    budget = 0.3 * (A * LAYERS * HEADS + M * LAYERS * CHANNELS)
    assert abs(removed - budget) <= A / 2
    # The next unit up the ranking would have taken the total further from the budget.
    next_up = z[plan.keep & ~best].idxmin()
    size = A if df.module[next_up] == "attn" else M
    assert abs(removed + size - budget) >= abs(removed - budget)


def test_flap_keeps_one_unit_and_a_block_per_layer_at_extreme_sparsity() -> None:
    widths = plan_widths(allocate_flap(scores(seed=9), 0.95, A, M, mlp_multiple=8))
    assert (widths.attn_kept >= 1).all() and (widths.mlp_kept >= 8).all() and (widths.mlp_kept % 8 == 0).all()


@pytest.mark.parametrize(
    "method,mode,expected",
    [
        ("nirvana", None, "nirvana"),
        ("magnitude", None, "nirvana"),
        ("taylor", None, "llm_pruner"),
        ("taylor", "nirvana", "nirvana"),
        ("random", None, "nirvana"),
        ("wanda_sp", None, "uniform"),
        ("flap", None, "flap"),
        ("flap", "uniform", "uniform"),
        ("nirvana", "flap", "flap"),
    ],
)
def test_a_null_mode_means_the_methods_own_allocation(method: str, mode: str | None, expected: str) -> None:
    params = defaults(Params, method=method, allocation=defaults(AllocationParams, mode=mode))
    assert allocation_mode(params) == expected
    assert set(AllocationParams.MODES) >= set(METHODS.values())


@pytest.mark.parametrize("mode", ["nirvana", "uniform", "flap"])
def test_attention_widths_round_to_attn_multiple(mode: str) -> None:
    """With 8 attention units a layer and attn_multiple 4, every layer keeps 4 or 8 and the removed
    parameters land within one attention block (plus one MLP channel) of the budget; uniform moves a
    block in every layer at once, so within half of that."""
    df = pd.concat([scores(seed=11), scores(seed=12).query("module == 'attn'").assign(unit=lambda d: d.unit + HEADS)])
    df = df.sort_values(["layer", "module", "unit"]).reset_index(drop=True)
    allocate_mode = {
        "nirvana": lambda: allocate(df, 0.3, 3.0, A, M, mlp_multiple=1, attn_multiple=4),
        "uniform": lambda: allocate_uniform(df, 0.3, A, M, mlp_multiple=1, attn_multiple=4),
        "flap": lambda: allocate_flap(df, 0.3, A, M, mlp_multiple=1, attn_multiple=4),
    }
    plan = allocate_mode[mode]()
    widths = plan_widths(plan)
    assert set(widths.attn_kept) <= {4, 8} and (widths.attn_dense == 8).all()
    budget = 0.3 * (A * LAYERS * 8 + M * LAYERS * CHANNELS)
    tolerance = LAYERS * 4 * A / 2 if mode == "uniform" else 4 * A + M
    assert abs(removed_params(plan) - budget) <= tolerance
