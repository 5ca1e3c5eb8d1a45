"""`random`: a set partition with exactly G groups, drawn uniformly among all S(H, G) of them.

Exact sampling through the Stirling recursion S(n, k) = k S(n-1, k) + S(n-1, k-1): the last head
either opens its own group (probability S(n-1, k-1) / S(n, k)) or joins one of the k groups of a
uniform partition of the other heads. No rejection, O(H G).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from gqa.grouping import Partition, canonical_partition
from search.strategies.base import Strategy, register_strategy


@register_strategy
@dataclass
class RandomPartition(Strategy):
    name = "random"

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        return random_partition(ctx.num_heads, num_groups, rng)


@cache
def stirling2(n: int, k: int) -> int:
    """Number of partitions of n labelled items into k non-empty unlabelled groups."""
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    return k * stirling2(n - 1, k) + stirling2(n - 1, k - 1)


def random_partition(num_heads: int, num_groups: int, rng: np.random.Generator) -> Partition:
    """A uniformly random partition of range(num_heads) into exactly num_groups groups."""
    if not 1 <= num_groups <= num_heads:
        raise ValueError(f"cannot split {num_heads} heads into {num_groups} groups")
    # Top-down, decide for heads n-1, ..., 0 whether each opens a new group ...
    opens, k = [False] * num_heads, num_groups
    for n in range(num_heads, 0, -1):
        opens[n - 1] = rng.random() * stirling2(n, k) < stirling2(n - 1, k - 1)
        k -= opens[n - 1]
    # ... then bottom-up, a joining head picks one of the groups that exist at that point.
    groups: list[list[int]] = []
    for head in range(num_heads):
        if opens[head]:
            groups.append([head])
        else:
            groups[rng.integers(len(groups))].append(head)
    return canonical_partition(groups, num_heads)
