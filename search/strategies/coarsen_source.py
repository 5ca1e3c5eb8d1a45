"""`coarsen_source`: every group is a union of the source model's KV groups.

For a GQA source, merging whole source groups costs nothing inside a group (its query heads
already share K and V), so this search space is only *which* source groups each layer merges:
the set partitions of the layer's n source groups into G blocks. There are S(n, G) of them
(Stirling numbers of the second kind: 3 for n = 3, G = 2; 1701 for n = 8, G = 4); up to
`max_enumerate` are enumerated, beyond that a single candidate is grown by merging the cheapest
pair of blocks first. Candidates are ranked by the guide proxy and, when the context has a
re-ranker (the study's `rank_proxy`, e.g. `recoverable`), the best `rerank_top` are re-ranked by
it. For G >= n no union exists: the source groups are split as `neighbour_kv` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from gqa.grouping import Partition
from search.strategies.base import Strategy, register_strategy
from search.strategies.evolutionary import all_partitions
from search.strategies.neighbour_kv import split_source_groups
from search.strategies.random_partition import stirling2


@register_strategy
@dataclass
class CoarsenSource(Strategy):
    name = "coarsen_source"
    seeded = False
    needs_proxy = True

    max_enumerate: int = 5000

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("max_enumerate", minimum=1)

    def candidate_partitions(self, ctx, layer, kind, num_groups, rng) -> list[Partition]:
        source = ctx.source_partition(layer, kind)
        n = len(source)
        if num_groups >= n:
            return [split_source_groups(source, num_groups)]
        if stirling2(n, num_groups) <= self.max_enumerate:
            blocks = all_partitions(n, num_groups)
        else:
            blocks = [_cheapest_merges(ctx, layer, kind, source, num_groups)]
        return [_unions(source, b) for b in blocks]

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        candidates = self.candidate_partitions(ctx, layer, kind, num_groups, rng)
        return min(candidates, key=lambda p: ctx.partition_error(layer, kind, p))


def _unions(source: Partition, blocks) -> Partition:
    """The partition of query heads whose groups are the unions of `blocks` of source groups."""
    return tuple(sorted(tuple(sorted(h for i in block for h in source[i])) for block in blocks))


def _cheapest_merges(ctx, layer: int, kind: str, source: Partition, k: int) -> list[list[int]]:
    """Merge, one pair at a time, the two blocks whose union adds the least guide-proxy error."""
    blocks = [[i] for i in range(len(source))]

    def error(block: list[int]) -> float:
        return ctx.partition_error(layer, kind, _unions(source, [block]))

    while len(blocks) > k:
        a, b = min(
            ((a, b) for a in range(len(blocks)) for b in range(a + 1, len(blocks))),
            key=lambda ab: (
                error(blocks[ab[0]] + blocks[ab[1]]) - error(blocks[ab[0]]) - error(blocks[ab[1]])
            ),
        )
        blocks[a] += blocks.pop(b)
    return blocks
