"""Byte budgets and the exact allocation of cache precision over layers.

A byte budget is KV-cache bytes per token, configured as a fraction of the source model's
16-bit cache (`ByteBudget.of_source`); "KV heads per layer" budgets are the 16-bit view of the
same thing. `allocate_precision` gives every layer's K and V the bits (from the allowed set, 16
included) that minimise the decomposed quantization error (objectives.proxies.kv_quant_error)
under the budget: a multiple-choice knapsack over the 2L (layer, kind) items, solved exactly by
dynamic programming over integer byte costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gqa.precision import LayerPrecision, PrecisionPlan, kind_bytes_per_token
from objectives.proxies.kv_quant_error import KINDS, QuantErrorTable

MAX_UNITS = 5_000_000  # DP cells per item beyond which the byte grid is too fine to be exact


class InfeasibleBudget(ValueError):
    """No plan with the allowed bits fits the byte budget."""


@dataclass(frozen=True)
class ByteBudget:
    """KV-cache bytes per token (steady state), and the fraction of the source cache it is."""

    bytes_per_token: float
    fraction: float

    @classmethod
    def of_source(cls, fraction: float, source_bytes: float) -> ByteBudget:
        if (
            not isinstance(fraction, int | float)
            or isinstance(fraction, bool)
            or not 0 < fraction <= 1
        ):
            raise ValueError(
                f"a byte budget is a fraction of the source cache in (0, 1], got {fraction!r}"
            )
        return cls(fraction * source_bytes, float(fraction))

    def label(self) -> str:
        return f"{100 * self.fraction:.3g}%"


def _costs(
    bits: Sequence[int], heads: int, head_dim: int, group_size: int, scale: int
) -> list[int]:
    """Integer costs (in 1/scale bytes) of each option: exact for these byte formulas."""
    out = []
    for b in bits:
        value = kind_bytes_per_token(heads, head_dim, b, group_size) * scale
        if abs(value - round(value)) > 1e-6:
            raise AssertionError(f"cost {value} is not integral at scale {scale}")
        out.append(int(round(value)))
    return out


def allocate_precision(
    table: QuantErrorTable,
    budget_bytes: float,
    head_dim: int,
    bits: Sequence[int] = (2, 3, 4, 8, 16),
) -> PrecisionPlan:
    """The plan of least summed error whose steady-state bytes per token are <= budget_bytes.

    Exact: the costs are integers in units of 1/(8 * group_size) byte, divided by their common
    divisor; dp[c] holds the least error of the items seen so far at total cost exactly c.
    """
    options = sorted({int(b) for b in bits} | {16})
    missing = [b for b in options if any(b not in row[k] for row in table.errors for k in KINDS)]
    if missing:
        raise ValueError(f"the error table has no entry for bits {missing}")
    scale = 8 * table.group_size
    items = []  # (layer, kind, costs, errors)
    for layer, row in enumerate(table.errors):
        for kind, heads in (("k", table.k_heads[layer]), ("v", table.v_heads[layer])):
            costs = _costs(options, heads, head_dim, table.group_size, scale)
            items.append((layer, kind, costs, [row[kind][b] for b in options]))
    unit = math.gcd(*(c for item in items for c in item[2]))
    limit = math.floor(budget_bytes * scale / unit + 1e-9)
    floor_cost = sum(min(item[2]) for item in items) // unit
    if limit < floor_cost:
        least = floor_cost * unit / scale
        raise InfeasibleBudget(
            f"a budget of {budget_bytes:.0f} B/token is below the least this grouping can cost "
            f"with bits {options} ({least:.0f} B/token)"
        )
    if limit > MAX_UNITS:
        raise ValueError(f"byte grid too fine for an exact allocation ({limit} cells)")
    best = np.full(limit + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(items), limit + 1), dtype=np.int8)
    for i, (_, _, costs, errors) in enumerate(items):
        new = np.full(limit + 1, np.inf)
        for j, (cost, error) in enumerate(zip(costs, errors, strict=True)):
            c = cost // unit
            if c > limit:
                continue
            candidate = np.full(limit + 1, np.inf)
            candidate[c:] = best[: limit + 1 - c] + error
            better = candidate < new
            new[better] = candidate[better]
            choices[i, better] = j
        best = new
    total = int(np.argmin(best))
    picked: dict[tuple[int, str], int] = {}
    for i in reversed(range(len(items))):
        layer, kind, costs, _ = items[i]
        j = int(choices[i, total])
        picked[layer, kind] = options[j]
        total -= costs[j] // unit
    layers = tuple(
        LayerPrecision(picked[layer, "k"], picked[layer, "v"]) for layer in range(len(table.errors))
    )
    return PrecisionPlan(layers, table.group_size, table.window)


def uniform_settings(bits: Sequence[int], group_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(k_bits, v_bits, group_size) of the uniform quantization baselines: keys never get fewer
    bits than values (keys are the more sensitive, as KIVI and KVQuant found)."""
    bits = sorted({int(b) for b in bits if b < 16}, reverse=True)
    return [(k, v, g) for g in group_sizes for k in bits for v in bits if v <= k]
