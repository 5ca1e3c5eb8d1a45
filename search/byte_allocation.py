"""Byte budgets and the exact allocation of cache precision over layers.

A byte budget is KV-cache bytes per token, configured as a fraction of the source model's
16-bit cache (`ByteBudget.of_source`); "KV heads per layer" budgets are the 16-bit view of the
same thing. `allocate_precision` gives every layer's K and V the bits (from the allowed set, 16
included) that minimise the decomposed quantization error (objectives.kv_quant_error) under
the budget: a multiple-choice knapsack over the 2L (layer, kind) items, solved exactly over
integer byte costs (search.knapsack). `allocate_joint` does the same with one item per layer
whose options are (model, K bits, V bits), and `allocate_latent` with one item per (layer, kind)
whose options are latent ranks (objectives.latent_error) at 16 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gqa.kv_quant import BITS
from gqa.latent import LatentLayer, LatentPlan
from gqa.precision import LayerPrecision, PrecisionPlan, kind_bytes_per_token
from objectives.kv_quant_error import KINDS, QuantErrorTable
from objectives.latent_error import LatentErrorTable
from search.knapsack import Infeasible, least_error


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


def _least_error(
    items: Sequence[Sequence[tuple[int, float]]], limit: float, scale: int, what: str
) -> list[int]:
    """The index of the option picked for each item (search.knapsack, total cost <= limit);
    `scale` converts costs back to bytes and `what` names the options for the error message."""
    try:
        return least_error(items, limit)
    except Infeasible as exc:
        raise InfeasibleBudget(
            f"a budget of {limit / scale:.0f} B/token is below the least {what} can cost "
            f"({exc.least / scale:.0f} B/token)"
        ) from None


def allocate_precision(
    table: QuantErrorTable,
    budget_bytes: float,
    head_dim: int,
    bits: Sequence[int] = BITS,
) -> PrecisionPlan:
    """The plan of least summed error whose steady-state bytes per token are <= budget_bytes:
    one item per (layer, kind), exact (costs are integers in units of 1/(8 * group_size) byte)."""
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
    picks = _least_error(
        [list(zip(item[2], item[3], strict=True)) for item in items],
        budget_bytes * scale,
        scale,
        "this grouping",
    )
    picked = {(item[0], item[1]): options[j] for item, j in zip(items, picks, strict=True)}
    layers = tuple(
        LayerPrecision(picked[layer, "k"], picked[layer, "v"]) for layer in range(len(table.errors))
    )
    return PrecisionPlan(layers, table.group_size, table.window)


def allocate_latent(
    table: LatentErrorTable, budget_bytes: float, dtype_bytes: int = 2
) -> tuple[LatentPlan, float]:
    """The latent plan of least summed error (table.errors) whose 16-bit cache costs at most
    `budget_bytes` per token, with that error: one item per (layer, kind), its options the
    measured ranks (the full width keeps the kind as it is)."""
    items, labels = [], []
    for layer, row in enumerate(table.errors):
        for kind in KINDS:
            ranks = table.ranks(layer, kind)
            items.append([(rank * dtype_bytes, row[kind][rank]) for rank in ranks])
            labels.append(ranks)
    picks = _least_error(items, budget_bytes, 1, "these ranks")
    chosen = [labels[i][j] for i, j in enumerate(picks)]
    layers = []
    for layer, widths in enumerate(table.widths):
        k, v = chosen[2 * layer], chosen[2 * layer + 1]
        layers.append(LatentLayer(None if k == widths["k"] else k, None if v == widths["v"] else v))
    error = sum(items[i][j][1] for i, j in enumerate(picks))
    return LatentPlan(tuple(layers)), error


def _kind_options(
    table: QuantErrorTable,
    latent: LatentErrorTable,
    layer: int,
    kind: str,
    bits: Sequence[int],
    head_dim: int,
    scale: int,
) -> list[tuple[int | None, int, int, float]]:
    """(latent rank or None, bits, integer cost, error) of each way one kind of a layer may be
    cached: on its heads at `bits` (the model's quantization errors), or as a latent at a measured
    (rank, bits) (the latent table's errors)."""
    heads = table.k_heads[layer] if kind == "k" else table.v_heads[layer]
    costs = _costs(bits, heads, head_dim, table.group_size, scale)
    out = [(None, b, c, table.errors[layer][kind][b]) for b, c in zip(bits, costs, strict=True)]
    width = latent.widths[layer][kind]
    for rank, b, error in latent.options(layer, kind):
        if rank < width and b in bits:
            (cost,) = _costs((b,), 1, rank, table.group_size, scale)
            out.append((rank, b, cost, error))
    return out


def uniform_settings(bits: Sequence[int], group_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(k_bits, v_bits, group_size) of the uniform quantization baselines: keys never get fewer
    bits than values (keys are the more sensitive, as KIVI and KVQuant found)."""
    bits = sorted({int(b) for b in bits if b < 16}, reverse=True)
    return [(k, v, g) for g in group_sizes for k in bits for v in bits if v <= k]


@dataclass(frozen=True)
class JointAllocation:
    """Per layer, which model's attention layer (grouping and recovered weights) it takes, the
    cache precision of every layer, and which layers are made latent (gqa.latent; None: none);
    `error` is the decomposed proxy error it minimised."""

    models: tuple[str, ...]
    plan: PrecisionPlan
    error: float
    latent: LatentPlan | None = None


def allocate_joint(
    tables: Mapping[str, QuantErrorTable],
    grouping_errors: Mapping[str, Sequence[float]],
    budget_bytes: float,
    head_dim: int,
    bits: Sequence[int] = BITS,
    latent: LatentErrorTable | None = None,
    latent_model: str | None = None,
) -> JointAllocation:
    """Head grouping and cache precision allocated together, layer by layer.

    A layer's option is (model m, K bits, V bits): m's attention layer (its K and V head counts)
    with its cache at those bits. Its error is grouping_errors[m][l] (what m's layer costs against
    the source's, 0 for the source) plus m's quantization errors of K and V at those bits: the
    same second-order, layer-decomposed estimate the precision allocation uses, so one exact
    multiple-choice knapsack (one item per layer) picks grouping and bits jointly. The per-model
    allocations are inside this search space, so its proxy error is never above theirs.

    With a `latent` table (objectives.latent_error, measured on `latent_model`'s layers), a layer
    may also be `latent_model`'s with K, V or both made latent at measured ranks, each latent at
    16 bits or at the bits the table measured it quantized (its `quantized` entries), a kind left
    on its heads at any allowed bits; the error is the model's grouping error plus each kind's.

    An infinite grouping error marks a layer that model may not give (a layer protected for its
    long-range cost, search.kv_front)."""
    names = list(tables)
    if not names or set(names) != set(grouping_errors):
        raise ValueError("tables and grouping_errors must name the same, non-empty set of models")
    if (latent is None) != (latent_model is None) or (latent and latent_model not in tables):
        raise ValueError("a latent table needs latent_model, one of the tables' models")
    first = tables[names[0]]
    if any((t.group_size, t.window) != (first.group_size, first.window) for t in tables.values()):
        raise ValueError("the error tables differ in group size or window")
    layers = len(first.errors)
    if any(len(t.errors) != layers or len(grouping_errors[n]) != layers for n, t in tables.items()):
        raise ValueError("the error tables differ in their number of layers")
    if latent is not None and len(latent.errors) != layers:
        raise ValueError("the latent table differs in its number of layers")
    if latent is not None and latent.quantized and latent.group_size != first.group_size:
        raise ValueError("the latent table's quantized entries differ in group size")
    options = sorted({int(b) for b in bits} | {16})
    scale = 8 * first.group_size
    items, labels = [], []
    for layer in range(layers):
        row, names_bits = [], []
        for name in names:
            if not math.isfinite(grouping_errors[name][layer]):
                continue
            table = tables[name]
            k_costs = _costs(options, table.k_heads[layer], head_dim, table.group_size, scale)
            v_costs = _costs(options, table.v_heads[layer], head_dim, table.group_size, scale)
            errors = table.errors[layer]
            for kb, kc in zip(options, k_costs, strict=True):
                for vb, vc in zip(options, v_costs, strict=True):
                    error = grouping_errors[name][layer] + errors["k"][kb] + errors["v"][vb]
                    row.append((kc + vc, error))
                    names_bits.append((name, kb, vb, None))
        if latent is not None and math.isfinite(grouping_errors[latent_model][layer]):
            base = grouping_errors[latent_model][layer]
            k_options, v_options = (
                _kind_options(tables[latent_model], latent, layer, kind, options, head_dim, scale)
                for kind in KINDS
            )
            for k_rank, kb, kc, ke in k_options:
                for v_rank, vb, vc, ve in v_options:
                    ranks = LatentLayer(k_rank, v_rank)
                    if ranks.is_latent:  # neither latent: the model's own option above
                        row.append((kc + vc, base + ke + ve))
                        names_bits.append((latent_model, kb, vb, ranks))
        items.append(row)
        labels.append(names_bits)
    picks = _least_error(items, budget_bytes * scale, scale, "these models")
    chosen = [labels[layer][j] for layer, j in enumerate(picks)]
    plan = PrecisionPlan(
        tuple(LayerPrecision(kb, vb) for _, kb, vb, _ in chosen), first.group_size, first.window
    )
    error = sum(items[layer][j][1] for layer, j in enumerate(picks))
    ranks = [r or LatentLayer() for *_, r in chosen]
    latent_plan = LatentPlan(tuple(ranks)) if any(r.is_latent for r in ranks) else None
    return JointAllocation(tuple(name for name, *_ in chosen), plan, error, latent_plan)
