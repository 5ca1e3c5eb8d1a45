"""The proxy interface: a cheap score of a candidate grouping (lower is better), per layer.

A proxy is built once per study from the source model and its calibration statistics, then
scores many groupings. `layer_scores` gives the per-layer breakdown; `score` the total.
Registered by name; adding one is one file with `@register_proxy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
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
    table_budget: int | None = None,
    tokenizer: object = None,
    long_config: object = None,
) -> Proxy:
    """Proxy `name` for `model`; `recovery` (a layer-wise recovery config or its fields) goes to
    the proxies that fit layers (`uses_recovery`), so they fit the way stage 2 recovers;
    `tokenizer` and `long_config` (objectives.long_context.LongContextConfig) to the proxies that
    read long documents (`uses_long_text`); `table_budget` (bytes) bounds the group tables a
    table proxy keeps at once."""
    cls = get_proxy(name)
    extra: dict[str, object] = {}
    if cls.uses_recovery:
        extra["recovery"] = recovery
    if cls.uses_long_text:
        if tokenizer is None or long_config is None:
            raise ValueError(
                f"proxy {name!r} reads long documents: it needs a tokenizer and a "
                "long-context config"
            )
        extra.update(tokenizer=tokenizer, long_config=long_config)
    proxy = cls(model, stats, merge=merge, **extra)
    if table_budget is not None:
        if not isinstance(proxy, GroupTableProxy):
            raise ValueError(f"proxy {name!r} keeps no group tables: a table budget needs one")
        if table_budget < 1:
            raise ValueError(f"table budget must be positive, got {table_budget} bytes")
        proxy.table_budget = int(table_budget)
    return proxy


class Proxy(ABC):
    name: ClassVar[str]
    cost: ClassVar[str]  # what scoring one candidate costs, in words
    decomposes: ClassVar[bool] = True  # score == sum of layer scores
    uses_recovery: ClassVar[bool] = False  # takes the study's layer-wise recovery config
    uses_long_text: ClassVar[bool] = False  # takes a tokenizer and a long-context config

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

    # Bytes of group tables kept at once (None: all). Past it the least recently used layer's
    # tables are dropped and rebuilt when next needed; their memos of group errors are kept, so
    # no group is ever scored twice and values do not change. At LLaMA-2-7B shape the fisher
    # tables take 214 MB per layer, 6.7 GB for 32 layers.
    table_budget: int | None = None

    def __init__(self, model: nn.Module, stats: CalibrationStats, merge: str = "mean"):
        super().__init__(model, stats, merge)
        self._tables: OrderedDict[tuple[int, str], object] = OrderedDict()  # least recent first
        self._memos: dict[tuple[int, str], dict] = {}  # group -> error, outliving its table
        self._layers: dict[tuple[int, LayerGrouping], float] = {}  # scored layer groupings
        self.builds = 0  # tables built, rebuilds included

    @abstractmethod
    def build_table(self, layer: int, kind: str):
        """A callable: group (tuple of query heads) -> error."""

    def table(self, layer: int, kind: str):
        key = (layer, kind)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = self._tables[key] = self.build_table(layer, kind)
        self.builds += 1
        if hasattr(table, "cache"):  # one memo per (layer, kind) for the proxy's lifetime
            table.cache = self._memos.setdefault(key, table.cache)
        if self.table_budget is not None:
            while len(self._tables) > 1 and self.table_bytes() > self.table_budget:
                self._tables.popitem(last=False)
        return table

    def _known(self, layer: int, kind: str, groups) -> list[float] | None:
        """The memoised errors of `groups`, or None if one is unknown (no table is built)."""
        memo = self._memos.get((layer, kind))
        if memo is None or (layer, kind) in self._tables:
            return None
        try:
            return [memo[g] for g in groups]
        except KeyError:
            return None

    def group_error(self, layer: int, kind: str, group: tuple[int, ...]) -> float:
        known = self._known(layer, kind, [group])
        return known[0] if known is not None else self.table(layer, kind)(group)

    def group_errors(self, layer: int, kind: str, groups, near=None) -> list[float]:
        """Errors of many groups (sorted tuples) at once: tables with an `errors` method score
        the new ones as one batch (see objectives.merge_error); others one by one. `near`: the
        groups of a partition the new groups are one move or swap away from (a speed hint)."""
        groups = list(groups)
        known = self._known(layer, kind, groups)
        if known is not None:
            return known
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
