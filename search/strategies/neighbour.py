"""`neighbour`: contiguous groups of near-equal size, the usual conversion baseline."""

from __future__ import annotations

from dataclasses import dataclass

from gqa.grouping import Partition, neighbour_partition
from search.strategies.base import Strategy, register_strategy


@register_strategy
@dataclass
class Neighbour(Strategy):
    """Heads 0..H-1 cut into G contiguous runs; the first H % G runs get one head more."""

    name = "neighbour"
    seeded = False

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        return neighbour_partition(ctx.num_heads, num_groups)
