"""`neighbour_kv`: contiguous groups over the source KV heads, the fair baseline for a GQA source.

Merging whole source groups costs nothing inside a group (its heads already share K/V), so for
G <= the number of source groups n, the n source groups are cut into G contiguous runs of
near-equal length (counted in source groups). For G > n, each source group is split into parts,
the extra parts going one at a time to the group whose parts are currently largest, and each
group is cut into contiguous near-equal parts. For an MHA source this is `neighbour`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gqa.grouping import Partition, neighbour_partition
from search.strategies.base import Strategy, register_strategy


@register_strategy
@dataclass
class NeighbourKV(Strategy):
    name = "neighbour_kv"
    seeded = False

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        source = ctx.source_partition(layer, kind)
        return split_source_groups(source, num_groups)


def split_source_groups(source: Partition, num_groups: int) -> Partition:
    """Contiguous merge (G <= len(source)) or near-even split (G > len(source)) of source groups."""
    n = len(source)
    if num_groups <= n:
        runs = neighbour_partition(n, num_groups)
        return tuple(tuple(sorted(h for i in run for h in source[i])) for run in runs)
    parts = [1] * n
    for _ in range(num_groups - n):
        # ceil(size / parts) is the largest part now; give a split to the worst group.
        largest = max(range(n), key=lambda i: (-(-len(source[i]) // parts[i]), -i))
        parts[largest] += 1
    groups = []
    for heads, p in zip(source, parts, strict=True):
        for run in neighbour_partition(len(heads), p):
            groups.append(tuple(heads[i] for i in run))
    return tuple(sorted(groups))
