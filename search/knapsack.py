"""The exact multiple-choice knapsack that both allocations solve.

The problem: n items, each with a list of options (cost, error); pick exactly one option per item
so that the summed error is least while the summed cost is at most a capacity, or exactly the
capacity. The head-budget allocation (search.budget) has one item per layer and kind, its options
the group counts G = 1..H at cost G, and a model-wide total to meet exactly. The byte allocation
(search.byte_allocation) has one item per (layer, kind), or per layer for the joint allocation,
its options the bits (and models) at their integer byte costs, and a byte budget not to exceed.

Shapes: `items[i][j] = (cost, error)`: costs are non-negative integers, errors floats (NaN is
refused, inf allowed). The answer `picks[i]` is the index j of the option taken for item i.

The dynamic programme: costs are divided by their greatest common divisor u, and C is the capacity
in those units. best[c], the least summed error of the items seen so far at a total cost of
exactly c (c = 0..C), starts at 0 for c = 0 and unreached elsewhere. Item i updates every cell at
once from each of its options in turn: best'[c] = min over j of best[c - cost_ij / u] + error_ij,
and choice[i, c] keeps the j. The answer's total is C (exact) or the reached c <= C of least
best[c] (the cheapest on a tie); walking the choices back from it gives the picks. Time
O(n * options * C), memory n * C for the choices. On a tie at a cell the option that reached it
first (earliest in its item's list) is kept, so callers order the options to say which they
prefer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

MAX_CELLS = 5_000_000  # cost cells beyond which the grid is too fine for an exact solution


class Infeasible(ValueError):
    """No choice of one option per item meets the capacity. `least` and `most` are the least
    and the greatest total cost a choice can have, in the items' cost units."""

    def __init__(self, message: str, least: int, most: int):
        super().__init__(message)
        self.least, self.most = least, most


def least_error(
    items: Sequence[Sequence[tuple[int, float]]], capacity: float, *, exact: bool = False
) -> list[int]:
    """The index of the option picked for each item: least summed error with summed cost at most
    `capacity` (or exactly `capacity` when `exact`). Raises Infeasible when no choice fits, and
    ValueError for an empty item, a negative or non-integer cost, a NaN error, or a capacity
    finer than MAX_CELLS cost units."""
    items = [list(options) for options in items]
    _check(items)
    unit = math.gcd(*(cost for options in items for cost, _ in options)) or 1
    least = sum(min(cost for cost, _ in options) for options in items)
    most = sum(max(cost for cost, _ in options) for options in items)
    cells = math.floor(capacity / unit + 1e-9)
    target_missed = exact and (capacity != cells * unit or cells * unit > most)
    if cells < least // unit or target_missed:
        raise Infeasible(
            f"no choice of one option per item costs {'exactly' if exact else 'at most'} "
            f"{capacity:g}: a choice costs {least} to {most}",
            least,
            most,
        )
    if cells > MAX_CELLS:
        raise ValueError(f"cost grid too fine for an exact solution ({cells} cells)")
    best = np.full(cells + 1, np.inf)
    best[0] = 0.0
    reached = np.zeros(cells + 1, dtype=bool)
    reached[0] = True
    width = max(len(options) for options in items)
    choices = np.zeros(
        (len(items), cells + 1), dtype=np.int16 if width <= np.iinfo(np.int16).max else np.int32
    )
    for i, options in enumerate(items):
        new = np.full(cells + 1, np.inf)
        new_reached = np.zeros(cells + 1, dtype=bool)
        for j, (cost, error) in enumerate(options):
            c = cost // unit
            if c > cells:
                continue
            candidate = best[: cells + 1 - c] + error
            better = reached[: cells + 1 - c] & (~new_reached[c:] | (candidate < new[c:]))
            new[c:][better] = candidate[better]
            new_reached[c:] |= better
            choices[i, c:][better] = j
        best, reached = new, new_reached
    if exact:
        if not reached[cells]:
            raise Infeasible(
                f"no choice of one option per item costs exactly {capacity:g}", least, most
            )
        total = cells
    else:
        candidates = np.flatnonzero(reached)
        total = int(candidates[np.argmin(best[candidates])])
    picks = []
    for i in reversed(range(len(items))):
        j = int(choices[i, total])
        picks.append(j)
        total -= items[i][j][0] // unit
    return picks[::-1]


def _check(items: list[list[tuple[int, float]]]) -> None:
    if not items:
        raise ValueError("a knapsack needs at least one item")
    for i, options in enumerate(items):
        if not options:
            raise ValueError(f"item {i} has no options")
        for cost, error in options:
            if isinstance(cost, bool) or not isinstance(cost, Integral) or cost < 0:
                raise ValueError(f"item {i}: cost {cost!r} is not a non-negative integer")
            if math.isnan(error):
                raise ValueError(f"item {i}: an option's error is NaN")
