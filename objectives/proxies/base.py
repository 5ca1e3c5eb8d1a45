"""The proxy interface: a cheap score of a candidate grouping (lower is better), per layer.

A proxy is built once per study from the source model and its calibration statistics, then
scores many groupings. `layer_scores` gives the per-layer breakdown; `score` the total.
Registered by name; adding one is one file with `@register_proxy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn

from gqa.adapters import get_adapter
from gqa.grouping import Grouping, LayerGrouping
from objectives.calibration import CalibrationStats

PROXIES: dict[str, type[Proxy]] = {}


def register_proxy(cls: type[Proxy]) -> type[Proxy]:
    PROXIES[cls.name] = cls
    return cls


def get_proxy(name: str) -> type[Proxy]:
    if name not in PROXIES:
        raise ValueError(f"unknown proxy {name!r} (available: {', '.join(sorted(PROXIES))})")
    return PROXIES[name]


def make_proxy(
    name: str,
    model: nn.Module,
    stats: CalibrationStats,
    merge: str = "mean",
    *,
    recovery: object = None,
) -> Proxy:
    """Proxy `name` for `model`; `recovery` (a layer-wise recovery config or its fields) goes to
    the proxies that fit layers (`uses_recovery`), so they fit the way stage 2 recovers."""
    cls = get_proxy(name)
    if cls.uses_recovery:
        return cls(model, stats, merge=merge, recovery=recovery)
    return cls(model, stats, merge=merge)


class Proxy(ABC):
    name: ClassVar[str]
    cost: ClassVar[str]  # what scoring one candidate costs, in words
    decomposes: ClassVar[bool] = True  # score == sum of layer scores
    uses_recovery: ClassVar[bool] = False  # takes the study's layer-wise recovery config

    def __init__(self, model: nn.Module, stats: CalibrationStats, merge: str = "mean"):
        self.model = model
        self.stats = stats
        self.merge = merge
        self.adapter = get_adapter(model)

    @abstractmethod
    def layer_score(self, layer: int, grouping: LayerGrouping) -> float:
        """Score of one layer's grouping (the others left as in the source)."""

    def layer_scores(self, grouping: Grouping) -> list[float]:
        grouping.check_model(self.adapter.num_layers, self.adapter.num_heads)
        return [self.layer_score(i, layer) for i, layer in enumerate(grouping.layers)]

    def score(self, grouping: Grouping) -> float:
        return float(sum(self.layer_scores(grouping)))


class GroupTableProxy(Proxy):
    """A proxy that decomposes over layers and groups: the sum over K groups and V groups of a
    per-group error, each group computed once and memoised (see objectives.merge_error)."""

    def __init__(self, model: nn.Module, stats: CalibrationStats, merge: str = "mean"):
        super().__init__(model, stats, merge)
        self._tables: dict[tuple[int, str], object] = {}
        self._layers: dict[tuple[int, LayerGrouping], float] = {}  # scored layer groupings

    @abstractmethod
    def build_table(self, layer: int, kind: str):
        """A callable: group (tuple of query heads) -> error."""

    def table(self, layer: int, kind: str):
        table = self._tables.get((layer, kind))
        if table is None:
            table = self._tables[(layer, kind)] = self.build_table(layer, kind)
        return table

    def group_error(self, layer: int, kind: str, group: tuple[int, ...]) -> float:
        return self.table(layer, kind)(group)

    def group_errors(self, layer: int, kind: str, groups, near=None) -> list[float]:
        """Errors of many groups (sorted tuples) at once: tables with an `errors` method score
        the new ones as one batch (see objectives.merge_error); others one by one. `near`: the
        groups of a partition the new groups are one move or swap away from (a speed hint)."""
        table = self.table(layer, kind)
        batched = getattr(table, "errors", None)
        return batched(groups, near) if batched is not None else [table(g) for g in groups]

    def table_bytes(self, layer: int | None = None) -> int:
        """Bytes held by the built group tables (of one layer, or all), for benchmarks."""
        return sum(
            getattr(table, "nbytes", 0)
            for (i, _), table in self._tables.items()
            if layer is None or i == layer
        )

    def layer_score(self, layer: int, grouping: LayerGrouping) -> float:
        # Searches revisit the same layer groupings constantly: memoise whole layers too.
        key = (layer, grouping)
        value = self._layers.get(key)
        if value is None:
            value = sum(self.group_errors(layer, "k", grouping.k)) + sum(
                self.group_errors(layer, "v", grouping.v)
            )
            self._layers[key] = value
        return value
