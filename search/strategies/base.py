"""The strategy interface: a seeded proposer of one grouping for a budget, and the registry.

A strategy's hyper-parameters are its dataclass fields. Proxies decompose over layers, so most
strategies only fill in `propose_partition` (one layer, one of K / V / shared K+V, G groups).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from torch import nn

from gqa.adapters import ModelAdapter, get_adapter
from gqa.grouping import (
    Grouping,
    LayerGrouping,
    Partition,
    canonical_partition,
    partition_from_index,
)
from gqa.surgery import current_grouping
from objectives.calibration import CalibrationStats
from objectives.proxies import GroupTableProxy, Proxy
from search.budget import Budget

KINDS = ("k", "v", "kv")  # "kv": one partition shared by K and V, scored by the sum of both
_KIND_CODE = {"k": 0, "v": 1, "kv": 2}

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its `name`."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} (available: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name]


def make_strategy(name: str, **params: Any) -> Strategy:
    """A strategy by name, with hyper-parameters by keyword (the rest keep their defaults)."""
    cls = get_strategy(name)
    known = [f.name for f in fields(cls) if f.init]
    for key in params:
        if key not in known:
            raise ValueError(
                f"strategy {name!r} has no parameter {key!r} (parameters: {', '.join(known)})"
            )
    return cls(**params)


@dataclass
class SearchContext:
    """What strategies may look at: sizes, the source layout, a proxy, calibration statistics."""

    num_heads: int
    num_layers: int
    proxy: Proxy | None
    source: Grouping
    stats: CalibrationStats | None = None
    adapter: ModelAdapter | None = None
    # Optional re-ranker of a layer's candidate partitions (e.g. the `recoverable` proxy): the best
    # `rerank_top` candidates by the guide proxy are re-ranked by it (see Strategy.layer_partition).
    reranker: Proxy | None = None
    rerank_top: int = 4
    # Per-context memo for derived data strategies reuse across calls (e.g. activation features).
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.source.check_model(self.num_layers, self.num_heads)
        if self.stats is None and self.proxy is not None:
            self.stats = self.proxy.stats
        if self.adapter is None and self.proxy is not None:
            self.adapter = self.proxy.adapter

    @classmethod
    def from_model(
        cls, model: nn.Module, proxy: Proxy | None = None, stats: CalibrationStats | None = None
    ) -> SearchContext:
        adapter = get_adapter(model)
        return cls(
            num_heads=adapter.num_heads,
            num_layers=adapter.num_layers,
            proxy=proxy,
            source=current_grouping(model),
            stats=stats,
            adapter=adapter,
        )

    # -- scoring ---------------------------------------------------------------------------------

    def table_proxy(self, who: str = "this strategy") -> GroupTableProxy:
        """The proxy, which must decompose over groups (a GroupTableProxy)."""
        if self.proxy is None:
            raise ValueError(
                f"{who} needs a proxy: build the SearchContext with one that decomposes over "
                "groups (kv_recon, attn_out, fisher, wse, act_cos)"
            )
        if not isinstance(self.proxy, GroupTableProxy):
            raise ValueError(
                f"{who} needs a proxy that decomposes over groups (kv_recon, attn_out, fisher, "
                f"wse, act_cos); {self.proxy.name!r} scores whole layers only"
            )
        return self.proxy

    def group_error(self, layer: int, kind: str, group) -> float:
        """Proxy error of one group of query heads; for kind "kv" the K error plus the V error."""
        proxy = self.table_proxy()
        group = tuple(sorted(group))
        if kind == "kv":
            return proxy.group_error(layer, "k", group) + proxy.group_error(layer, "v", group)
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return proxy.group_error(layer, kind, group)

    def group_errors(self, layer: int, kind: str, groups, near=None) -> list[float]:
        """`group_error` of many groups at once: the proxy scores the new ones as one batch.
        `near`: groups the new ones are one move or swap away from (a local search's partition),
        which lets group tables build them incrementally."""
        proxy = self.table_proxy()
        groups = [tuple(sorted(g)) for g in groups]
        near = None if near is None else [tuple(sorted(g)) for g in near]
        if kind == "kv":
            k = proxy.group_errors(layer, "k", groups, near)
            v = proxy.group_errors(layer, "v", groups, near)
            return [a + b for a, b in zip(k, v, strict=True)]
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return proxy.group_errors(layer, kind, groups, near)

    def partition_error(self, layer: int, kind: str, partition) -> float:
        return float(sum(self.group_errors(layer, kind, partition)))

    def partition_errors(self, layer: int, kind: str, partitions) -> list[float]:
        """`partition_error` of many partitions, their new groups scored as one batch."""
        partitions = list(partitions)
        self.group_errors(layer, kind, [g for p in partitions for g in p])  # fills the memo
        return [self.partition_error(layer, kind, p) for p in partitions]

    # -- other inputs ----------------------------------------------------------------------------

    def source_partition(self, layer: int, kind: str) -> Partition:
        """The source model's own grouping of the query heads (for "kv": heads that share both
        their K and their V source head)."""
        lg = self.source.layers[layer]
        if kind == "k":
            return lg.k
        if kind == "v":
            return lg.v
        k_of = {h: i for i, g in enumerate(lg.k) for h in g}
        v_of = {h: i for i, g in enumerate(lg.v) for h in g}
        labels = {}
        return partition_from_index(
            [labels.setdefault((k_of[h], v_of[h]), len(labels)) for h in range(self.num_heads)]
        )

    def require_stats(self, who: str) -> tuple[CalibrationStats, ModelAdapter]:
        if self.stats is None or self.adapter is None:
            raise ValueError(
                f"{who} needs calibration statistics and the model: use "
                "SearchContext.from_model(model, proxy, stats)"
            )
        return self.stats, self.adapter


def _rerank(ctx: SearchContext, layer: int, kind: str, candidates: list[Partition]) -> Partition:
    """The first candidate, or with several: the best of the guide proxy's top `ctx.rerank_top`
    by `ctx.reranker`. The re-ranker scores a whole layer grouping; a K (V) candidate is scored
    with V (K) as in the source, a shared candidate as both."""
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) == 1:
        return candidates[0]
    if ctx.proxy is not None:
        candidates.sort(key=lambda p: ctx.partition_error(layer, kind, p))
    if ctx.reranker is None:
        return candidates[0]
    source = ctx.source.layers[layer]
    top = candidates[: max(1, ctx.rerank_top)]
    return min(top, key=lambda p: ctx.reranker.layer_score(layer, with_partition(source, kind, p)))


def with_partition(source: LayerGrouping, kind: str, partition: Partition) -> LayerGrouping:
    """The layer grouping `source` with `partition` as its K ("k"), V ("v") or both ("kv")."""
    if kind == "kv":
        return LayerGrouping(partition, partition)
    if kind == "k":
        return LayerGrouping(partition, source.v)
    if kind == "v":
        return LayerGrouping(source.k, partition)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@dataclass
class Strategy(ABC):
    """Proposes a grouping for a budget. Hyper-parameters are fields; subclasses validate theirs
    in `__post_init__` (calling super) and raise ValueError naming the field."""

    name: ClassVar[str]
    needs_proxy: ClassVar[bool] = False
    needs_stats: ClassVar[bool] = False
    seeded: ClassVar[bool] = True  # False: the proposal never depends on `seed`

    seed: int = 0
    share_kv: bool = False  # one partition per layer for K and V (where their budgets are equal)

    def __post_init__(self) -> None:
        self.check_int("seed", minimum=0)
        if not isinstance(self.share_kv, bool):
            self.fail("share_kv", "must be True or False")

    # -- the interface ---------------------------------------------------------------------------

    def propose(self, ctx: SearchContext, budget: Budget) -> Grouping:
        """A grouping with exactly budget.k[l] K groups and budget.v[l] V groups in layer l."""
        budget.check(ctx.num_layers, ctx.num_heads)
        self.check_context(ctx)
        k, v = [], []
        for layer in range(ctx.num_layers):
            # share_kv shares where it can: a layer given unequal K and V budgets (e.g. by an
            # allocation of K and V apart) gets one partition of each.
            if self.share_kv and budget.k[layer] == budget.v[layer]:
                shared = self.layer_partition(ctx, layer, "kv", budget.k[layer])
                k.append(shared)
                v.append(shared)
            else:
                k.append(self.layer_partition(ctx, layer, "k", budget.k[layer]))
                v.append(self.layer_partition(ctx, layer, "v", budget.v[layer]))
        return Grouping.create(ctx.num_heads, k, v)

    @abstractmethod
    def propose_partition(
        self, ctx: SearchContext, layer: int, kind: str, num_groups: int, rng: np.random.Generator
    ) -> Partition:
        """A partition of range(num_heads) into exactly `num_groups` groups (1 < G < H)."""

    def candidate_partitions(
        self, ctx: SearchContext, layer: int, kind: str, num_groups: int, rng: np.random.Generator
    ) -> list[Partition]:
        """Partitions worth comparing for this layer, for re-ranking; by default the one proposed.
        Strategies that see several good candidates (enumerations, populations) return them all."""
        return [self.propose_partition(ctx, layer, kind, num_groups, rng)]

    def check_context(self, ctx: SearchContext) -> None:
        """Fail early, before any work, when the context lacks what this strategy reads."""
        if self.needs_proxy:
            ctx.table_proxy(f"strategy {self.name!r}")
        if self.needs_stats:
            ctx.require_stats(f"strategy {self.name!r}")

    # -- helpers ---------------------------------------------------------------------------------

    def layer_partition(
        self, ctx: SearchContext, layer: int, kind: str, num_groups: int
    ) -> Partition:
        """`propose_partition` with its own random stream, the two trivial G, and a check.

        The stream depends only on (seed, layer, kind, G), so a layer's answer does not depend on
        the order in which layers are visited or on what else was proposed before."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        h = ctx.num_heads
        if not 1 <= num_groups <= h:
            raise ValueError(f"cannot split {h} heads into {num_groups} groups")
        if num_groups == 1:
            return (tuple(range(h)),)
        if num_groups == h:
            return tuple((i,) for i in range(h))
        rng = np.random.default_rng([self.seed, layer, _KIND_CODE[kind], num_groups])
        where = f"strategy {self.name!r}, layer {layer} {kind}"
        candidates = [
            canonical_partition(p, h, where)
            for p in self.candidate_partitions(ctx, layer, kind, num_groups, rng)
        ]
        partition = _rerank(ctx, layer, kind, candidates)
        if len(partition) != num_groups:
            raise RuntimeError(
                f"strategy {self.name!r} returned {len(partition)} groups for layer {layer} "
                f"{kind}, {num_groups} were asked for"
            )
        return partition

    def params(self) -> dict[str, Any]:
        """The hyper-parameters, e.g. to record with a trial."""
        return asdict(self)

    def uses_seed(self) -> bool:
        """Whether another seed can give another grouping (a study runs a strategy that does not
        at most once per budget and setting: a second run would only repeat the first)."""
        return self.seeded

    def fail(self, field_name: str, problem: str) -> None:
        raise ValueError(
            f"strategy {self.name!r}: {field_name} {problem}, got {getattr(self, field_name)!r}"
        )

    def check_int(self, field_name: str, minimum: int = 0) -> None:
        value = getattr(self, field_name)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
            self.fail(field_name, f"must be an integer >= {minimum}")

    def check_real(self, field_name: str, low: float, high: float) -> None:
        value = getattr(self, field_name)
        if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
            self.fail(field_name, f"must be a number in [{low}, {high}]")

    def check_choice(self, field_name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, field_name) not in choices:
            self.fail(field_name, f"must be one of {', '.join(map(repr, choices))}")
