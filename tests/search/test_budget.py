"""Budgets: validation, even spreading over layers, and exact allocation against brute force."""

import itertools

import numpy as np
import pytest

from search.budget import Budget, allocate, allocate_kv_together


def test_budget_counts_and_totals():
    b = Budget([1, 2, 3], (2, 2, 2))
    assert b.k == (1, 2, 3) and isinstance(b.k, tuple)
    assert b.total == 12 and b.num_layers == 3
    assert b.kv_heads_per_layer == 2.0
    assert Budget.uniform(4, 2) == Budget((2,) * 4, (2,) * 4)
    assert Budget.uniform(2, 3, 1) == Budget((3, 3), (1, 1))


@pytest.mark.parametrize(
    "k, v, message",
    [
        ((1, 0), (1, 1), "K count of layer 1 is 0: every layer needs at least 1 group"),
        ((1, 1), (1, 1.5), r"V count of layer 1 is 1.5, not an integer"),
        ((1, 1), (1,), "budget has 2 K counts but 1 V counts"),
        ((), (), "at least one layer"),
        ((True,), (1,), "not an integer"),
    ],
)
def test_budget_validation_messages(k, v, message):
    with pytest.raises(ValueError, match=message):
        Budget(k, v)


def test_budget_check_against_a_model():
    b = Budget((2, 9), (1, 1))
    with pytest.raises(ValueError, match="budget is for 2 layers but the model has 3"):
        b.check(3, 9)
    with pytest.raises(ValueError, match=r"layer 1 9 K groups but there are only 8 query heads"):
        b.check(2, 8)
    b.check(2, 9)


def test_spread_interleaves_an_uneven_total():
    b = Budget.spread(30, 45)
    assert b.k == (1, 2) * 15 and b.v == b.k
    assert Budget.spread(4, 6, 5).v == (1, 1, 1, 2)
    for layers, total in [(7, 7), (7, 20), (5, 13), (30, 270)]:
        counts = Budget.spread(layers, total).k
        assert sum(counts) == total and max(counts) - min(counts) <= 1


def test_spread_refuses_infeasible_totals():
    with pytest.raises(ValueError, match=r"cannot spread 29 K groups over 30 layers.*total >= 30"):
        Budget.spread(30, 29)
    with pytest.raises(ValueError, match=r"cannot spread 28 V groups over 3 layers of 9 heads"):
        Budget.spread(3, 3, 28, num_heads=9)
    assert Budget.spread(3, 27, num_heads=9) == Budget.uniform(3, 9)


def test_from_average():
    assert Budget.from_average(30, 1.5) == Budget.spread(30, 45, 45)
    assert Budget.from_average(30, 2).kv_heads_per_layer == 2.0
    assert sum(Budget.from_average(4, 1.125).k) == 5  # 4.5 rounds up
    with pytest.raises(ValueError, match="every layer needs at least one"):
        Budget.from_average(30, 0.5)
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        Budget.from_average(0, 2)


def test_of_a_grouping():
    from gqa.grouping import Grouping

    g = Grouping.create(
        4, [[[0, 1], [2, 3]], [[0, 1, 2, 3]]], [[[0], [1], [2, 3]], [[0, 3], [1, 2]]]
    )
    assert Budget.of(g) == Budget((2, 1), (3, 2))


def _brute(curves, total):
    best = min(
        (sum(c[g - 1] for c, g in zip(curves, gs, strict=True)), gs)
        for gs in itertools.product(*(range(1, len(c) + 1) for c in curves))
        if sum(gs) == total
    )
    return best[0]


def test_allocate_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        curves_k = rng.random((4, 4)).tolist()
        curves_v = rng.random((4, 4)).tolist()
        for total in range(4, 17):
            b = allocate(curves_k, curves_v, total, 20 - total)
            assert sum(b.k) == total
            cost = sum(c[g - 1] for c, g in zip(curves_k, b.k, strict=True))
            assert cost == pytest.approx(_brute(curves_k, total))
            cost_v = sum(c[g - 1] for c, g in zip(curves_v, b.v, strict=True))
            assert cost_v == pytest.approx(_brute(curves_v, sum(b.v)))


def test_allocate_prefers_the_layers_where_groups_help():
    # layer 0 gains a lot from a second group, layer 1 nothing
    b = allocate([[10, 0], [1, 1]], [[1, 1], [10, 0]], 3, 3)
    assert b == Budget((2, 1), (1, 2))


def test_allocate_shared_curves_give_equal_k_and_v():
    curves = np.random.default_rng(1).random((3, 5)).tolist()
    b = allocate(curves, curves, 8, 8)
    assert b.k == b.v


@pytest.mark.parametrize("total, kind", [(3, "K"), (17, "K")])
def test_allocate_refuses_infeasible_totals(total, kind):
    curves = [[1.0, 0.5, 0.2, 0.0]] * 4
    with pytest.raises(
        ValueError, match=rf"{kind} total of {total} groups is infeasible .* 4\.\.16"
    ):
        allocate(curves, curves, total, 8)


def test_allocate_refuses_bad_curves():
    with pytest.raises(ValueError, match="V error curve of layer 1 contains NaN"):
        allocate([[1.0], [1.0]], [[1.0], [float("nan")]], 2, 2)
    with pytest.raises(ValueError, match="K error curves are empty"):
        allocate([], [[1.0]], 1, 1)


def test_allocate_kv_together_matches_brute_force_over_both_kinds():
    rng = np.random.default_rng(2)
    for _ in range(3):
        curves_k = rng.random((3, 4)).tolist()
        curves_v = rng.random((3, 4)).tolist()
        for total in range(6, 25):
            b = allocate_kv_together(curves_k, curves_v, total)
            assert b.total == total
            cost = sum(c[g - 1] for c, g in zip(curves_k + curves_v, b.k + b.v, strict=True))
            assert cost == pytest.approx(_brute(curves_k + curves_v, total))


def test_allocate_kv_together_keeps_the_kind_whose_merge_costs_more():
    # merging keys costs 10x what merging values does: every merge falls on V
    keys = [[10.0, 5.0, 0.0]] * 2
    values = [[1.0, 0.5, 0.0]] * 2
    assert allocate_kv_together(keys, values, 8) == Budget((3, 3), (1, 1))
    assert allocate_kv_together(values, keys, 8) == Budget((1, 1), (3, 3))


def test_allocate_kv_together_refuses_mismatched_curves_and_infeasible_totals():
    with pytest.raises(ValueError, match="2 K error curves but 1 V error curves"):
        allocate_kv_together([[1.0], [1.0]], [[1.0]], 3)
    with pytest.raises(ValueError, match=r"K\+V total of 3 groups is infeasible .* 4\.\.8"):
        allocate_kv_together([[1.0, 0.0]] * 2, [[1.0, 0.0]] * 2, 3)
