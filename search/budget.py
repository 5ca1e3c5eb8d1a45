"""KV budgets: how many K groups and V groups each layer gets, and how to share a model-wide total.

`Budget` is the per-layer group counts a strategy must meet; `allocate` splits a total over layers
so that the summed per-layer error is minimal (exactly: search.knapsack over the error curves).
`allocate_kv_together` also chooses how one total divides between K and V: at long range merging
keys costs far more than merging values (docs/long_context.md), so a layer may keep its keys and
share its values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from tqdm.auto import tqdm

from search.knapsack import least_error


@dataclass(frozen=True)
class Budget:
    """Per-layer numbers of K groups (`k`) and V groups (`v`): the cached heads of each layer.

    Validated on creation (positive integers, as many V counts as K counts); `check` validates
    against a model (one count per layer, at most one group per query head).
    """

    k: tuple[int, ...]
    v: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _counts(self.k, "K"))
        object.__setattr__(self, "v", _counts(self.v, "V"))
        if len(self.k) != len(self.v):
            raise ValueError(f"budget has {len(self.k)} K counts but {len(self.v)} V counts")
        if not self.k:
            raise ValueError("a budget needs at least one layer")

    @classmethod
    def uniform(cls, num_layers: int, g: int, g_v: int | None = None) -> Budget:
        """`g` K groups (and `g_v` V groups, default `g`) in every layer."""
        _check_layers(num_layers)
        return cls((g,) * num_layers, ((g if g_v is None else g_v),) * num_layers)

    @classmethod
    def spread(
        cls,
        num_layers: int,
        total_k: int,
        total_v: int | None = None,
        *,
        num_heads: int | None = None,
    ) -> Budget:
        """A model-wide total of K (V) groups spread as evenly as possible, interleaved over layers:
        45 over 30 layers gives 1, 2, 1, 2, ... V total defaults to the K total. With `num_heads`,
        a total above num_layers * num_heads is refused here rather than by `check`."""
        _check_layers(num_layers)
        total_v = total_k if total_v is None else total_v
        return cls(
            _spread(num_layers, total_k, num_heads, "K"),
            _spread(num_layers, total_v, num_heads, "V"),
        )

    @classmethod
    def from_average(
        cls, num_layers: int, avg_kv_heads_per_layer: float, *, num_heads: int | None = None
    ) -> Budget:
        """`spread` of round(avg * num_layers) groups for K and the same for V (half rounds up).

        The average counts groups of one kind, as `kv_heads_per_layer` does: "2 KV heads per
        layer" is 2 K heads and 2 V heads in every layer."""
        _check_layers(num_layers)
        total = math.floor(avg_kv_heads_per_layer * num_layers + 0.5)
        if total < num_layers:
            raise ValueError(
                f"an average of {avg_kv_heads_per_layer} KV heads per layer is {total} groups "
                f"over {num_layers} layers; every layer needs at least one (average >= "
                f"{(num_layers - 0.5) / num_layers:.3g})"
            )
        return cls.spread(num_layers, total, total, num_heads=num_heads)

    @classmethod
    def of(cls, grouping) -> Budget:
        """The budget a `gqa.grouping.Grouping` spends."""
        return cls(
            tuple(layer.num_k_groups for layer in grouping.layers),
            tuple(layer.num_v_groups for layer in grouping.layers),
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def total(self) -> int:
        """Cached heads per token over the whole model, K and V counted separately."""
        return sum(self.k) + sum(self.v)

    @property
    def kv_heads_per_layer(self) -> float:
        """Average number of groups per layer and kind: total / (2 * num_layers)."""
        return self.total / (2 * self.num_layers)

    def check(self, num_layers: int, num_heads: int) -> None:
        """Raise ValueError if this budget does not fit a model of these sizes."""
        if self.num_layers != num_layers:
            raise ValueError(
                f"budget is for {self.num_layers} layers but the model has {num_layers}"
            )
        for kind, counts in (("K", self.k), ("V", self.v)):
            for layer, g in enumerate(counts):
                if g > num_heads:
                    raise ValueError(
                        f"budget gives layer {layer} {g} {kind} groups but there are only "
                        f"{num_heads} query heads (1 <= G <= {num_heads})"
                    )


def _check_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")


def _counts(counts: Sequence[int], kind: str) -> tuple[int, ...]:
    try:
        counts = tuple(counts)
    except TypeError:
        raise ValueError(f"budget {kind} counts must be a sequence of integers") from None
    for layer, g in enumerate(counts):
        if isinstance(g, bool) or not isinstance(g, Integral):
            raise ValueError(f"budget {kind} count of layer {layer} is {g!r}, not an integer")
        if g < 1:
            raise ValueError(
                f"budget {kind} count of layer {layer} is {g}: every layer needs at least 1 group"
            )
    return tuple(int(g) for g in counts)


def _spread(num_layers: int, total: int, num_heads: int | None, kind: str) -> tuple[int, ...]:
    if isinstance(total, bool) or not isinstance(total, Integral):
        raise ValueError(f"{kind} total must be an integer, got {total!r}")
    if total < num_layers:
        raise ValueError(
            f"cannot spread {total} {kind} groups over {num_layers} layers: every layer needs "
            f"at least one (total >= {num_layers})"
        )
    if num_heads is not None and total > num_layers * num_heads:
        raise ValueError(
            f"cannot spread {total} {kind} groups over {num_layers} layers of {num_heads} heads: "
            f"at most {num_heads} per layer (total <= {num_layers * num_heads})"
        )
    # Bresenham: layer l gets floor((l+1) T / L) - floor(l T / L), so the extra groups are spaced
    # evenly through the depth rather than bunched at one end.
    return tuple(
        (layer + 1) * total // num_layers - layer * total // num_layers
        for layer in range(num_layers)
    )


def allocate(
    curves_k: Sequence[Sequence[float]],
    curves_v: Sequence[Sequence[float]],
    total_k: int,
    total_v: int,
) -> Budget:
    """The per-layer counts that minimise the summed error for the given totals, K and V apart.

    curves[l][G-1] is the (best known) error of layer l with G groups, G = 1..H. Exact: the
    multiple-choice knapsack of search.knapsack (one item per layer, cost G), O(L * total * H).
    For a shared-K/V strategy pass the same "kv" curves twice with equal totals; the answer then
    has k == v.
    """
    return Budget(_allocate(curves_k, total_k, "K"), _allocate(curves_v, total_v, "V"))


def allocate_kv_together(
    curves_k: Sequence[Sequence[float]], curves_v: Sequence[Sequence[float]], total: int
) -> Budget:
    """The per-layer K and V counts that minimise the summed K and V error for one `total` of
    cached heads (K and V counted apart, as `Budget.total` does): one knapsack over 2L items, so
    the curves decide how many of the heads are keys. The K and V errors must be in one unit
    (e.g. the late-position loss that each kind's merge adds, as `long_range` measures)."""
    if len(curves_k) != len(curves_v):
        raise ValueError(f"{len(curves_k)} K error curves but {len(curves_v)} V error curves")
    counts = _allocate([*curves_k, *curves_v], total, "K+V")
    return Budget(counts[: len(curves_k)], counts[len(curves_k) :])


def _allocate(curves: Sequence[Sequence[float]], total: int, kind: str) -> tuple[int, ...]:
    curves = [np.asarray(c, dtype=float) for c in curves]
    if not curves:
        raise ValueError(f"{kind} error curves are empty: one curve per layer is needed")
    for layer, curve in enumerate(curves):
        if curve.ndim != 1 or curve.size == 0:
            raise ValueError(f"{kind} error curve of layer {layer} must be a non-empty list")
        if np.isnan(curve).any():
            raise ValueError(f"{kind} error curve of layer {layer} contains NaN")
    low, high = len(curves), sum(c.size for c in curves)
    if isinstance(total, bool) or not isinstance(total, Integral) or not low <= total <= high:
        raise ValueError(
            f"{kind} total of {total!r} groups is infeasible for {len(curves)} layers: it must be "
            f"in {low}..{high} (at least 1 and at most H groups per layer)"
        )
    # One item per layer, its options G = H..1 at cost G; listed from the most groups down, so
    # that on a tie the later layers take the more groups.
    items = [[(g, curve[g - 1]) for g in range(curve.size, 0, -1)] for curve in curves]
    picks = least_error(items, total, exact=True)
    return tuple(options[j][0] for options, j in zip(items, picks, strict=True))


def error_curves(strategy, ctx, kind: str, score=None, progress: bool = False) -> list[list[float]]:
    """curves[l][G-1] = the proxy error of `strategy`'s partition of layer l into G groups, or
    `score(layer, partition)` of it when given (e.g. a recoverability score).

    kind is "k", "v" or "kv" (K + V error of one shared partition). Cost: the strategy is run
    once per layer and per G = 2..H-1 (G = 1 and G = H have a single partition), i.e. about
    L * H runs: cheap for neighbour/kmeans/hierarchical, L * H times the per-layer cost for
    greedy or evolutionary. Needs a context whose proxy decomposes over groups.
    """
    if kind not in ("k", "v", "kv"):
        raise ValueError(f"kind must be 'k', 'v' or 'kv', got {kind!r}")
    strategy.check_context(ctx)
    ctx.table_proxy("error_curves")
    if score is None:
        score = lambda layer, partition: ctx.partition_error(layer, kind, partition)  # noqa: E731
    layers = tqdm(range(ctx.num_layers), desc=f"{kind} error curves", disable=not progress)
    return [
        [
            score(layer, strategy.layer_partition(ctx, layer, kind, g))
            for g in range(1, ctx.num_heads + 1)
        ]
        for layer in layers
    ]
