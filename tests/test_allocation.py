"""Allocation: the requested share, p_mlp = gamma * p_attn, guards, exact and stable counts."""

import numpy as np
import pandas as pd
import pytest

from nirvana.allocation import allocate, layer_widths, pool_fractions

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
    widths = layer_widths(plan)
    assert (widths.attn_kept >= 1).all() and (widths.mlp_kept >= 8).all()
    assert (widths.mlp_kept % 8 == 0).all()
    for layer, part in plan[plan.module == "attn"].groupby("layer"):
        assert part[part.keep].score.max() == part.score.max(), f"layer {layer} lost its best unit"


@pytest.mark.parametrize("multiple", [4, 8])
def test_mlp_widths_are_multiples_and_the_count_stays_close(multiple: int) -> None:
    plan = allocate(scores(seed=3), 0.3, 3.0, A, M, mlp_multiple=multiple)
    widths = layer_widths(plan)
    assert (widths.mlp_kept % multiple == 0).all()
    _, p_m = pool_fractions(0.3, 3.0, A, LAYERS * HEADS, M, LAYERS * CHANNELS)
    removed = (~plan.keep & (plan.module == "mlp")).sum()
    assert abs(removed - round(p_m * LAYERS * CHANNELS)) <= multiple / 2


def test_odd_widths_round_the_kept_count_to_the_multiple() -> None:
    df = scores(seed=4)
    df = df[~((df.module == "mlp") & (df.unit >= 60))].reset_index(drop=True)  # 60 channels a layer
    widths = layer_widths(allocate(df, 0.3, 3.0, A, M, mlp_multiple=8))
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
