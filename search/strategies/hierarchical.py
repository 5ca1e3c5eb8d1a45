"""`hierarchical`: agglomerative clustering on a proxy-derived distance between heads.

d(a, b) = e({a, b}) - e({a}) - e({b}): what merging the two heads alone costs under the proxy
(e is the proxy's group error; e({a}) is 0 for a head that keeps its own source head). The
dendrogram is cut at exactly G clusters. Cost: H (H - 1) / 2 pair errors per layer and kind,
memoised by the proxy, so every G after the first is nearly free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering

from gqa.grouping import Partition, partition_from_index
from search.strategies.base import SearchContext, Strategy, register_strategy

LINKAGES = ("average", "complete", "single")  # ward needs Euclidean features, not a distance


@register_strategy
@dataclass
class Hierarchical(Strategy):
    name = "hierarchical"
    seeded = False
    needs_proxy = True

    linkage: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("linkage", LINKAGES)

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        labels = AgglomerativeClustering(
            n_clusters=num_groups, metric="precomputed", linkage=self.linkage
        ).fit_predict(pair_distances(ctx, layer, kind))
        return partition_from_index(labels)


def pair_distances(ctx: SearchContext, layer: int, kind: str) -> np.ndarray:
    """(H, H) symmetric merge costs d(a, b), clipped at 0, zero diagonal."""
    h = ctx.num_heads
    single = ctx.group_errors(layer, kind, [(a,) for a in range(h)])
    pairs = [(a, b) for a in range(h) for b in range(a + 1, h)]
    dist = np.zeros((h, h))
    for (a, b), e in zip(pairs, ctx.group_errors(layer, kind, pairs), strict=True):  # one batch
        dist[a, b] = dist[b, a] = max(e - single[a] - single[b], 0.0)
    return dist
