"""search.knapsack: the exact multiple-choice knapsack, against brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from search.knapsack import Infeasible, least_error


def _instance(rng: random.Random) -> list[list[tuple[int, float]]]:
    """A few items of a few options; costs share a random unit, errors often tie."""
    unit = rng.choice([1, 2, 3, 8])
    ties = rng.random() < 0.5
    return [
        [
            (unit * rng.randint(0, 6), float(rng.randint(0, 3)) if ties else rng.random())
            for _ in range(rng.randint(1, 4))
        ]
        for _ in range(rng.randint(1, 5))
    ]


def _brute_force(items, fits) -> float:
    """The least summed error over every choice whose total cost `fits`; inf when none does."""
    best = math.inf
    for choice in itertools.product(*items):
        if fits(sum(cost for cost, _ in choice)):
            best = min(best, sum(error for _, error in choice))
    return best


def _cost_and_error(items, picks) -> tuple[int, float]:
    chosen = [options[j] for options, j in zip(items, picks, strict=True)]
    return sum(cost for cost, _ in chosen), sum(error for _, error in chosen)


@pytest.mark.parametrize("exact", [False, True])
def test_least_error_matches_brute_force(exact):
    rng = random.Random(7)
    solved = infeasible = 0
    for _ in range(300):
        items = _instance(rng)
        totals = sorted({sum(c) for c in itertools.product(*[[c for c, _ in o] for o in items])})
        capacity = rng.choice([*totals, totals[0] - 1, totals[-1] + 1, totals[-1] // 2])
        if exact:
            expected = _brute_force(items, lambda cost, c=capacity: cost == c)
        else:
            expected = _brute_force(items, lambda cost, c=capacity: cost <= c)
        if expected == math.inf:
            with pytest.raises(Infeasible):
                least_error(items, capacity, exact=exact)
            infeasible += 1
            continue
        picks = least_error(items, capacity, exact=exact)
        cost, error = _cost_and_error(items, picks)
        assert cost == capacity if exact else cost <= capacity
        assert error == pytest.approx(expected, rel=1e-12, abs=1e-12)
        solved += 1
    assert solved > 100 and infeasible > 10  # both cases were exercised


def test_at_most_takes_the_cheapest_of_equal_errors():
    items = [[(2, 1.0), (4, 0.0)], [(3, 0.0), (1, 0.0)]]
    assert least_error(items, 10) == [1, 1]  # cost 5, not 7, for the same error 0


def test_the_first_listed_option_wins_a_tie():
    assert least_error([[(1, 1.0), (2, 0.5)], [(2, 0.5), (1, 1.0)]], 3, exact=True) == [0, 0]
    assert least_error([[(2, 0.5), (1, 1.0)], [(1, 1.0), (2, 0.5)]], 3, exact=True) == [0, 0]


def test_infeasible_capacity_says_what_a_choice_costs():
    items = [[(4, 1.0), (6, 0.0)], [(2, 1.0), (3, 0.5)]]
    with pytest.raises(Infeasible, match="costs at most 5: a choice costs 6 to 9") as info:
        least_error(items, 5)
    assert (info.value.least, info.value.most) == (6, 9)
    assert isinstance(info.value, ValueError)
    with pytest.raises(Infeasible, match="costs exactly 10"):
        least_error(items, 10, exact=True)  # above the most a choice costs
    with pytest.raises(Infeasible, match="costs exactly 7"):
        least_error([[(2, 0.0), (4, 0.0)], [(4, 0.0)]], 7, exact=True)  # costs are even
    with pytest.raises(Infeasible, match="costs exactly 4"):
        least_error([[(0, 0.0), (3, 0.0)], [(0, 0.0), (5, 0.0)]], 4, exact=True)  # 0, 3, 5, 8


def test_bad_items_are_refused():
    with pytest.raises(ValueError, match="at least one item"):
        least_error([], 3)
    with pytest.raises(ValueError, match="item 1 has no options"):
        least_error([[(1, 0.0)], []], 3)
    with pytest.raises(ValueError, match="not a non-negative integer"):
        least_error([[(-1, 0.0)]], 3)
    with pytest.raises(ValueError, match="not a non-negative integer"):
        least_error([[(1.5, 0.0)]], 3)
    with pytest.raises(ValueError, match="NaN"):
        least_error([[(1, float("nan"))]], 3)
