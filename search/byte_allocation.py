"""Byte budgets and the exact allocation of cache precision over layers.

A byte budget is KV-cache bytes per token, configured as a fraction of the source model's
16-bit cache (`ByteBudget.of_source`); "KV heads per layer" budgets are the 16-bit view of the
same thing. `ByteCounting` says how a cache's bytes per token are counted: in the steady state
(the full-precision window excluded), or at a context length, where the window's tokens and the
last partial block, kept at 16 bits, are counted too (what a cache of that many tokens holds).
`allocate_precision` gives every layer's K and V the bits (from the allowed set, 16 included)
that minimise the decomposed quantization error (objectives.kv_quant_error) under
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
from gqa.precision import (
    LayerPrecision,
    PrecisionPlan,
    kind_bytes_per_token,
    kind_cache_bytes,
)
from objectives.kv_quant_error import KINDS, QuantErrorTable
from objectives.latent_error import LatentErrorTable
from search.knapsack import Infeasible, least_error


class InfeasibleBudget(ValueError):
    """No plan with the allowed bits fits the byte budget."""


@dataclass(frozen=True)
class ByteBudget:
    """KV-cache bytes per token, and the fraction of the source's 16-bit cache it is (the source
    at 16 bits stores every token alike, so the fraction means the same at every context)."""

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


@dataclass(frozen=True)
class ByteCounting:
    """How the allocations count a cache's bytes per token, in integer units (`scale` units per
    byte per token), so that the knapsack is exact.

    With `context` None: the steady state, gqa.precision's per-token formula (the window excluded:
    it does not grow with the context). With `context` L: the exact bytes of a cache holding L
    tokens (gqa.precision.kind_cache_bytes: the `window` most recent tokens and the last partial
    block at 16 bits) divided by L. Without a window and with L a multiple of the group size the
    two agree."""

    group_size: int
    window: int = 0
    context: int | None = None

    def __post_init__(self) -> None:
        if self.context is not None and (isinstance(self.context, bool) or self.context < 1):
            raise ValueError(
                f"a byte-counting context is a positive token count, got {self.context!r}"
            )

    @property
    def scale(self) -> int:
        return 8 * self.group_size if self.context is None else self.context

    def cost(self, bits: int, heads: int, width: int) -> int:
        """Integer cost of one kind of one layer: `heads` cached heads of `width` values."""
        if self.context is not None:
            return kind_cache_bytes(bits, heads, width, self.context, self.group_size, self.window)
        value = kind_bytes_per_token(heads, width, bits, self.group_size) * self.scale
        if abs(value - round(value)) > 1e-6:
            raise AssertionError(f"cost {value} is not integral at scale {self.scale}")
        return int(round(value))

    def per_token(self, bits: int, heads: int, width: int) -> float:
        """Bytes per token of one kind of one layer, as counted."""
        return self.cost(bits, heads, width) / self.scale

    def costs(self, bits: Sequence[int], heads: int, width: int) -> list[int]:
        return [self.cost(b, heads, width) for b in bits]


def _least_error(
    items: Sequence[Sequence[tuple[int, float]]], budget_bytes: float, scale: int, what: str
) -> list[int]:
    """The index of the option picked for each item (search.knapsack, total cost <= the budget
    in bytes per token times `scale`, the cost units per byte per token); `what` names the
    options for the error message."""
    try:
        return least_error(items, budget_bytes * scale)
    except Infeasible as exc:
        raise InfeasibleBudget(
            f"a budget of {budget_bytes:.0f} B/token is below the least {what} can cost "
            f"({exc.least / scale:.0f} B/token)"
        ) from None


def allocate_precision(
    table: QuantErrorTable,
    budget_bytes: float,
    head_dim: int,
    bits: Sequence[int] = BITS,
    context: int | None = None,
) -> PrecisionPlan:
    """The plan of least summed error whose bytes per token (counted at `context`, or in the
    steady state: `ByteCounting`) are <= budget_bytes: one item per (layer, kind), exact."""
    options = sorted({int(b) for b in bits} | {16})
    missing = [b for b in options if any(b not in row[k] for row in table.errors for k in KINDS)]
    if missing:
        raise ValueError(f"the error table has no entry for bits {missing}")
    counting = ByteCounting(table.group_size, table.window, context)
    items = []  # (layer, kind, costs, errors)
    for layer, row in enumerate(table.errors):
        for kind, heads in (("k", table.k_heads[layer]), ("v", table.v_heads[layer])):
            costs = counting.costs(options, heads, head_dim)
            items.append((layer, kind, costs, [row[kind][b] for b in options]))
    picks = _least_error(
        [list(zip(item[2], item[3], strict=True)) for item in items],
        budget_bytes,
        counting.scale,
        "this grouping",
    )
    picked = {(item[0], item[1]): options[j] for item, j in zip(items, picks, strict=True)}
    layers = tuple(
        LayerPrecision(picked[layer, "k"], picked[layer, "v"]) for layer in range(len(table.errors))
    )
    return PrecisionPlan(layers, table.group_size, table.window)


def allocate_latent(
    table: LatentErrorTable, budget_bytes: float, context: int | None = None
) -> tuple[LatentPlan, float]:
    """The latent plan of least summed error (table.errors) whose 16-bit cache costs at most
    `budget_bytes` per token, with that error: one item per (layer, kind), its options the
    measured ranks (the full width keeps the kind as it is). At 16 bits every token is stored
    alike, so `context` changes the units, not the answer."""
    counting = ByteCounting(1, 0, context)
    items, labels = [], []
    for layer, row in enumerate(table.errors):
        for kind in KINDS:
            ranks = table.ranks(layer, kind)
            items.append([(counting.cost(16, 1, rank), row[kind][rank]) for rank in ranks])
            labels.append(ranks)
    picks = _least_error(items, budget_bytes, counting.scale, "these ranks")
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
    counting: ByteCounting,
) -> list[tuple[int | None, int, int, float]]:
    """(latent rank or None, bits, integer cost, error) of each way one kind of a layer may be
    cached: on its heads at `bits` (the model's quantization errors), or as a latent at a measured
    (rank, bits) (the latent table's errors)."""
    heads = table.k_heads[layer] if kind == "k" else table.v_heads[layer]
    costs = counting.costs(bits, heads, head_dim)
    out = [(None, b, c, table.errors[layer][kind][b]) for b, c in zip(bits, costs, strict=True)]
    width = latent.widths[layer][kind]
    for rank, b, error in latent.options(layer, kind):
        if rank < width and b in bits:
            cost = counting.cost(b, 1, rank)
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
    context: int | None = None,
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
    long-range cost, search.kv_front). Bytes are counted at `context` (`ByteCounting`)."""
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
    counting = ByteCounting(first.group_size, first.window, context)
    items, labels = [], []
    for layer in range(layers):
        row, names_bits = [], []
        for name in names:
            if not math.isfinite(grouping_errors[name][layer]):
                continue
            table = tables[name]
            k_costs = counting.costs(options, table.k_heads[layer], head_dim)
            v_costs = counting.costs(options, table.v_heads[layer], head_dim)
            errors = table.errors[layer]
            for kb, kc in zip(options, k_costs, strict=True):
                for vb, vc in zip(options, v_costs, strict=True):
                    error = grouping_errors[name][layer] + errors["k"][kb] + errors["v"][vb]
                    row.append((kc + vc, error))
                    names_bits.append((name, kb, vb, None))
        if latent is not None and math.isfinite(grouping_errors[latent_model][layer]):
            base = grouping_errors[latent_model][layer]
            k_options, v_options = (
                _kind_options(
                    tables[latent_model], latent, layer, kind, options, head_dim, counting
                )
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
    picks = _least_error(items, budget_bytes, counting.scale, "these models")
    chosen = [labels[layer][j] for layer, j in enumerate(picks)]
    plan = PrecisionPlan(
        tuple(LayerPrecision(kb, vb) for _, kb, vb, _ in chosen), first.group_size, first.window
    )
    error = sum(items[layer][j][1] for layer, j in enumerate(picks))
    ranks = [r or LatentLayer() for *_, r in chosen]
    latent_plan = LatentPlan(tuple(ranks)) if any(r.is_latent for r in ranks) else None
    return JointAllocation(tuple(name for name, *_ in chosen), plan, error, latent_plan)
